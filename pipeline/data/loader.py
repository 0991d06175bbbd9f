"""Batches of a preprocessed split, dealt to ranks without communication.

Work units are parquet row groups, cut into equal row slices when there are fewer than
``UNITS_PER_RANK`` per rank (finer shuffling on small splits). Per epoch the units are
permuted (seeded by ``(seed, epoch)`` when shuffling) and their rows too (seeded by
``(seed, epoch, unit)``); the units in that order form one row stream, and rank ``r``
reads the ``r``-th of ``world_size`` equal shares of it. Every rank decides alone, from
parquet metadata, what it reads, and no rows are left over but the remainder:

- train (``drop_last``): every batch has ``batch_size`` rows; every rank yields
  ``num_batches()`` = ``(rows // world_size) // batch_size`` batches;
- eval: every row of the split is seen once over all ranks; the last batch is padded,
  and ranks with fewer batches add padding batches, so all ranks yield the same count.
  Padding rows have label ``-1``, id 0 for every key, dense and weights 0.

A multi-hot layout (``data.multi_hot_sizes``) turns each id of its multi-hot keys into
that id's bag (``pipeline.data.multi_hot``), padding rows' too.

Batches are built in a background thread, ``prefetch`` ahead.

Example:
    >>> layout = FeatureLayout.from_meta(DatasetMeta.load(path), "embedding")  # doctest: +SKIP
    >>> reader = SplitReader(path, "train", layout, batch_size=4096, rank=1, world_size=4)  # doctest: +SKIP
    >>> for batch in reader.batches(epoch=0, start=100): ...  # resumes at batch 100  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.data.batch import Batch, concat_batches
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import DatasetMeta
from pipeline.data.schema import LABEL
from sharding.kjt import single_hot_kjt

UNITS_PER_RANK = 4


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of row group ``row_group`` of shard ``file``."""

    file: int
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Rows:
    """Decoded rows: ``labels [n]``, ``dense [n, 13]``, ``ids [n, len(id_columns)]``."""

    labels: np.ndarray
    dense: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, lo: int, hi: int) -> "Rows":
        return Rows(self.labels[lo:hi], self.dense[lo:hi], self.ids[lo:hi])


class SplitTooSmall(ValueError):
    """A split holds too few rows for one batch on every rank."""


class SplitReader:
    """One rank's batches of one split.

    Args:
        data_dir: the dataset directory (``metadata.json`` and shards).
        split: ``train``, ``val`` or ``test``.
        layout: the run's ``FeatureLayout`` (keys and the columns they come from).
        batch_size: rows per batch, per rank.
        rank, world_size: this rank and the number of ranks.
        seed: seeds the unit and row permutations (with the epoch).
        shuffle: permute units and rows per epoch; else a fixed order.
        drop_last: full batches only, equal counts on all ranks (train); else every
            row once, padded (evaluation).
        prefetch: batches built ahead by a background thread (0: build inline).
        transform: rewrites each batch's KJT in the background thread, e.g. the
            repacked model's ``sharding.repack.KeyRewriter``.
    """

    def __init__(
        self, data_dir: str | Path, split: str, layout: FeatureLayout, batch_size: int,
        rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
        drop_last: bool = True, prefetch: int = 2,
        transform: Optional[Callable[[KeyedJaggedTensor], KeyedJaggedTensor]] = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data_dir = Path(data_dir)
        meta = DatasetMeta.load(self.data_dir)
        if split not in meta.files:
            raise ValueError(f"{self.data_dir}: no split {split!r} (has {sorted(meta.files)})")
        self.split, self.layout, self.batch_size = split, layout, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last, self.prefetch = shuffle, drop_last, prefetch
        self.transform = transform
        self.dense_columns = tuple(meta.dense_fields)
        self.paths = [self.data_dir / f for f in meta.files[split]]
        self.units = _units([pq.ParquetFile(p).metadata for p in self.paths], world_size)
        self._num_batches = self._count_batches()
        if self._num_batches == 0:
            raise SplitTooSmall(
                f"{self.data_dir} {split}: {sum(u.rows for u in self.units)} rows give no "
                f"batch of {batch_size} on each of {world_size} ranks"
            )

    def num_batches(self) -> int:
        """Batches every rank yields per epoch; the same on all ranks, every epoch."""
        return self._num_batches

    def rank_pieces(self, epoch: int, rank: Optional[int] = None) -> list[tuple[int, int, int]]:
        """``(unit index, lo, hi)``: the rows ``[lo, hi)`` of each (row-shuffled) unit that
        ``rank`` (default: this rank) reads in ``epoch``, in reading order.

        The units, in the epoch's order, form one row stream; rank ``r`` reads its
        ``r``-th equal share of it (the first ``total % world_size`` ranks one row more).
        """
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        rank = self.rank if rank is None else rank
        base, extra = divmod(sum(u.rows for u in self.units), self.world_size)
        begin = rank * base + min(rank, extra)
        end = begin + base + (rank < extra)
        pieces, position = [], 0
        for index in order.tolist():
            rows = self.units[index].rows
            lo, hi = max(begin - position, 0), min(end - position, rows)
            if lo < hi:
                pieces.append((index, lo, hi))
            position += rows
            if position >= end:
                break
        return pieces

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """This rank's batches ``start, start+1, ...`` of ``epoch``; skipped units are not read."""
        if not 0 <= start <= self._num_batches:
            raise ValueError(f"start {start} outside [0, {self._num_batches}]")
        batches = self._produce(epoch, start)
        return _prefetched(batches, self.prefetch) if self.prefetch > 0 else batches

    def _count_batches(self) -> int:
        base, extra = divmod(sum(u.rows for u in self.units), self.world_size)
        if self.drop_last:
            return base // self.batch_size
        return math.ceil((base + (extra > 0)) / self.batch_size)

    def _produce(self, epoch: int, start: int) -> Iterator[Batch]:
        emitted, pending = start, []
        for rows in self._rows(epoch, skip=start * self.batch_size):
            pending.append(rows)
            while emitted < self._num_batches and sum(map(len, pending)) >= self.batch_size:
                batch, pending = _take(pending, self.batch_size)
                yield self._batch(batch)
                emitted += 1
            if emitted == self._num_batches:
                return
        if pending and not self.drop_last:
            yield self._batch(_pad(_take(pending, sum(map(len, pending)))[0], self.batch_size))
            emitted += 1
        for _ in range(emitted, self._num_batches):
            yield self._batch(_pad(None, self.batch_size, len(self.dense_columns), len(self.layout.id_columns)))

    def _rows(self, epoch: int, skip: int) -> Iterator[Rows]:
        """This rank's row stream from row ``skip`` on, piece by piece."""
        for index, lo, hi in self.rank_pieces(epoch):
            if skip >= hi - lo:
                skip -= hi - lo
                continue
            rows = self._read(self.units[index])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, index]).permutation(len(rows))
                rows = Rows(rows.labels[perm], rows.dense[perm], rows.ids[perm])
            yield rows.slice(lo + skip, hi)
            skip = 0

    def _read(self, unit: Unit) -> Rows:
        columns = [LABEL, *self.dense_columns, *self.layout.id_columns]
        # A slice decodes its whole row group: slices only exist when row groups are
        # too few to spread over the ranks, i.e. on small splits.
        table = pq.ParquetFile(self.paths[unit.file]).read_row_group(unit.row_group, columns=columns)
        return table_rows(table.slice(unit.start, unit.rows), self.dense_columns, self.layout.id_columns)

    def _batch(self, rows: Rows) -> Batch:
        return rows_batch(rows, self.layout, self.transform)


def table_rows(table, dense_columns: Sequence[str], id_columns: Sequence[str]) -> Rows:
    """The ``Rows`` of a table with the shard columns (``pipeline.data.schema``)."""
    dense = np.stack([_column(table, c, np.float32) for c in dense_columns], 1)
    ids = np.stack([_column(table, c, np.int64) for c in id_columns], 1)
    labels = _column(table, LABEL, np.float32).copy()  # arrow's buffer is read-only
    return Rows(labels, dense, ids)


def key_ids(
    dense: torch.Tensor, ids: torch.Tensor, layout: FeatureLayout,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ids ``[F, B]`` of every key of ``layout`` and their weights (``None`` without dense
    keys), from a batch's dense values ``[B, D]`` and id columns ``[C, B]``.

    Dense keys are one-row tables (id 0) scaled by the value, so padding rows weigh 0.
    """
    if not layout.dense_keys:
        return ids, None
    batch, num_dense = ids.shape[1], len(layout.dense_keys)
    return (
        torch.cat([ids.new_zeros(num_dense, batch), ids]),
        torch.cat([dense.T, dense.new_ones(ids.shape[0], batch)]),
    )


def rows_batch(
    rows: Rows, layout: FeatureLayout,
    transform: Optional[Callable[[KeyedJaggedTensor], KeyedJaggedTensor]] = None,
) -> Batch:
    """The model's ``Batch`` of ``rows`` under ``layout``: one id per key, or the bag of
    each multi-hot key's id (``layout.multi_hot``)."""
    dense = torch.from_numpy(np.ascontiguousarray(rows.dense))
    ids = torch.from_numpy(np.ascontiguousarray(rows.ids.T))
    make_kjt = single_hot_kjt if layout.multi_hot is None else layout.multi_hot.kjt
    sparse = make_kjt(layout.keys, *key_ids(dense, ids, layout))
    if transform is not None:
        sparse = transform(sparse)
    return Batch(dense=dense, sparse=sparse, labels=torch.from_numpy(rows.labels))


def _column(table, name: str, dtype) -> np.ndarray:
    return table.column(name).to_numpy().astype(dtype, copy=False)


def _units(metas: list, world_size: int) -> list[Unit]:
    """Row groups, cut into slices of equal size when fewer than ``UNITS_PER_RANK`` per rank."""
    groups = [(f, g, m.row_group(g).num_rows) for f, m in enumerate(metas) for g in range(m.num_row_groups)]
    groups = [g for g in groups if g[2] > 0]
    total = sum(n for *_, n in groups)
    slice_rows = max(n for *_, n in groups) if groups else 1
    if len(groups) < UNITS_PER_RANK * world_size:
        slice_rows = max(1, math.ceil(total / (UNITS_PER_RANK * world_size)))
    return [Unit(f, g, lo, min(lo + slice_rows, n)) for f, g, n in groups for lo in range(0, n, slice_rows)]


def _take(pending: list[Rows], n: int) -> tuple[Rows, list[Rows]]:
    """The first ``n`` rows of ``pending`` as one ``Rows``, and what is left."""
    parts, taken = [], 0
    while taken < n:
        head = pending.pop(0)
        part = head.slice(0, n - taken)
        if len(part) < len(head):
            pending.insert(0, head.slice(len(part), len(head)))
        parts.append(part)
        taken += len(part)
    if len(parts) == 1:
        return parts[0], pending
    return Rows(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("labels", "dense", "ids"))), pending


def _pad(rows: Optional[Rows], size: int, num_dense: int = 0, num_ids: int = 0) -> Rows:
    """``rows`` (or nothing) padded to ``size`` rows of label -1, dense 0, id 0."""
    if rows is not None:
        num_dense, num_ids = rows.dense.shape[1], rows.ids.shape[1]
    pad = Rows(
        np.full(size, -1, np.float32), np.zeros((size, num_dense), np.float32),
        np.zeros((size, num_ids), np.int64),
    )
    if rows is None:
        return pad
    n = len(rows)
    return Rows(*(np.concatenate([getattr(rows, k), getattr(pad, k)[n:]]) for k in ("labels", "dense", "ids")))


_DONE = object()
# Prefetch threads still running, stopped and joined at exit: a daemon thread left inside
# pyarrow while the interpreter shuts down aborts the process ("terminate called without
# an active exception"), which happens when a stage ends with an iterator still open.
_LIVE: dict[threading.Thread, threading.Event] = {}


@atexit.register
def _stop_prefetching() -> None:
    for thread, stop in list(_LIVE.items()):
        stop.set()
        thread.join(timeout=10)


def _prefetched(produce: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run the iterator ``produce`` in a thread, ``depth`` items ahead.

    Exceptions of the producer are re-raised here; closing (or dropping) the returned
    iterator stops the thread.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in produce:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put(error)

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    _LIVE[thread] = stop
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
        _LIVE.pop(thread, None)


def search_batches(
    train: SplitReader, val: SplitReader, alpha_interval: int, epoch: int, start: int,
    global_step: int,
) -> Iterator[Batch]:
    """DNIS search steps: train batch ``start + i`` of ``epoch`` is global step
    ``global_step + i``; on α steps (``step % alpha_interval == 0``) the validation
    batch of α-step ``k = step // alpha_interval`` follows it in the same ``Batch``.

    α-step ``k`` uses batch ``k % n`` of validation cycle ``k // n`` (``n`` =
    ``val.num_batches()``, the cycle is the reader's epoch), so a resumed search sees
    the same batches as an uninterrupted one.
    """
    if alpha_interval < 1:
        raise ValueError(f"alpha_interval must be >= 1, got {alpha_interval}")
    if not val.drop_last:
        raise ValueError("search_batches needs a validation reader with drop_last=True (no padding)")
    n = val.num_batches()
    val_iter = None
    try:
        for i, batch in enumerate(train.batches(epoch, start)):
            step = global_step + i
            if step % alpha_interval:
                yield batch
                continue
            k = step // alpha_interval
            if val_iter is None or k % n == 0:
                if val_iter is not None:
                    val_iter.close()
                val_iter = iter(val.batches(epoch=k // n, start=k % n))
            yield concat_batches([batch, next(val_iter)])
    finally:
        if val_iter is not None:
            val_iter.close()
