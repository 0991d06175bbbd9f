"""Merging pass 1's per-chunk counts into the vocabulary, in key ranges that fit a budget.

Pass 1 leaves, per chunk, one or more *runs* (``count_runs``): every field's distinct
train keys (ascending) and their counts over a stretch of the chunk, in
``_work/counts/<chunk>/<run>.keys.npy`` / ``.counts.npy``, fields back to back (``offsets``
and ``sizes``, [run, field], in ``<chunk>.npz``). A field whose keys could overflow the
memory budget is cut into ``2**bits`` key ranges; each ``(field, range)`` task (spread over
the workers and ranks) sums the slices of every run of every chunk from memory-mapped
files (a key in several runs or chunks is summed like any other), moves keys seen
fewer than ``min_count`` times into the OOV count and spills the rest, with a histogram
of their counts, to ``_work/merge/``. Ranking then needs only the histograms: a key's id
is the number of kept keys with a larger count, plus those with its count in lower
ranges or with a smaller key in its range, plus one if the OOV id (first among equal
counts) comes before it. That is exactly ``vocab.frequency_rank`` over the whole field,
yet no process holds a whole field's counts.

Example: with budget for 1M keys per task, a field of 3M distinct keys across the chunks
gets ``bits = 2``: ranges ``[0, 2**30)``, ``[2**30, 2**31)``, ... of the uint32 hex value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.count_runs import run_file
from pipeline.data.vocab import VocabularyWriter

# Peak bytes per key of a range task: summing (concatenated keys and counts, np.unique's
# sort and inverse) measured 71, ranking it for the vocabulary (``pieces``) 76 (tracemalloc,
# 2M keys per range).
MERGE_BYTES_PER_KEY = 80
KEY_BITS = 32  # categorical keys are uint32; bucket keys are small and land in range 0
MAX_RANGE_BITS = 16  # 65536 ranges of a field: beyond that a task's per-chunk overhead dominates


@dataclass(frozen=True)
class MergeTask:
    """Range ``part`` of ``2**bits`` key ranges of field number ``field`` (named ``name``)."""

    name: str
    field: int
    part: int
    bits: int

    @property
    def stem(self) -> str:
        return f"{self.name}.{self.part:05d}"


def range_bounds(keys: np.ndarray, part: int, bits: int) -> tuple[int, int]:
    """``[lo, hi)`` positions of the sorted ``keys`` in range ``part`` of ``2**bits``;
    keys below 0 fall in the first range and keys of ``2**32`` and above in the last.

    >>> range_bounds(np.array([-5, 1, 2**31, 2**40]), part=1, bits=1)
    (2, 4)
    """
    shift = KEY_BITS - bits
    lo = 0 if part == 0 else int(np.searchsorted(keys, part << shift))
    hi = len(keys) if part == (1 << bits) - 1 else int(np.searchsorted(keys, (part + 1) << shift))
    return lo, hi


def range_bits(upper_keys: int, memory_bytes: int) -> int:
    """Fewest range bits (at most 16) whose ranges of ``upper_keys`` keys merge within
    ``memory_bytes``.

    >>> range_bits(3_000_000, memory_bytes=80 << 20)  # 1M keys per range: 4 ranges
    2
    """
    need = upper_keys * MERGE_BYTES_PER_KEY / max(memory_bytes, 1)
    return min(MAX_RANGE_BITS, math.ceil(math.log2(need))) if need > 1 else 0


def plan_merge(work: Path, chunk_ids: list[str], fields: tuple[str, ...], memory_bytes: int) -> list[MergeTask]:
    """The merge tasks: a field's range count follows the sum of its keys over every run
    (what a task concatenates; an upper bound of its distinct keys), so the plan is the
    same on every rank."""
    upper = np.zeros(len(fields), np.int64)
    for cid in chunk_ids:
        with np.load(work / "counts" / f"{cid}.npz") as z:
            upper += z["sizes"].sum(axis=0)
    return [MergeTask(name, j, part, bits)
            for j, name in enumerate(fields)
            for bits in [range_bits(int(upper[j]), memory_bytes)]
            for part in range(1 << bits)]


def spill_path(work: Path, task: MergeTask) -> Path:
    return work / "merge" / f"{task.stem}.npz"


def merge_range(task: MergeTask, work: Path, chunk_ids: list[str], min_count: int) -> None:
    """Sum one key range of one field over every run of every chunk; spill kept keys,
    counts, the histogram of counts, and the rare keys' number and total count to
    ``_work/merge/<field>.<range>.npz``."""
    key_parts, count_parts = [], []
    for cid in chunk_ids:
        with np.load(work / "counts" / f"{cid}.npz") as z:
            bounds = z["offsets"][:, task.field : task.field + 2].tolist()
        for run, (start, end) in enumerate(bounds):
            keys = np.load(run_file(work, cid, run, "keys"), mmap_mode="r")[start:end]
            lo, hi = range_bounds(keys, task.part, task.bits)
            key_parts.append(np.array(keys[lo:hi]))
            counts = np.load(run_file(work, cid, run, "counts"), mmap_mode="r")
            count_parts.append(np.array(counts[start + lo : start + hi]))
    keys, inverse = np.unique(np.concatenate(key_parts), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(count_parts), minlength=keys.size).astype(np.int64)
    kept = counts >= max(min_count, 1)
    levels, level_sizes = np.unique(counts[kept], return_counts=True)
    path = spill_path(work, task)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=keys[kept], counts=counts[kept], rare=np.int64(counts[~kept].sum()),
             rare_keys=np.int64(keys.size - kept.sum()), levels=levels, level_sizes=level_sizes)
    os.replace(tmp, path)


def write_vocabulary(work: Path, tasks: list[MergeTask], missing: dict[str, int], directory: Path) -> dict:
    """Rank every field from the spilled ranges and write ``directory``; returns
    ``{"vocab_sizes", "oov_ids", "id_counts", "distinct_values"}`` (id counts run-length
    encoded; distinct values: train keys before ``min_count``)."""
    writer = VocabularyWriter(directory)
    sizes, oov_ids, id_counts, distinct = {}, {}, {}, {}
    for name in dict.fromkeys(t.name for t in tasks):
        parts = [t for t in tasks if t.name == name]
        ranking = _FieldRanking(work, parts, missing.get(name, 0))
        writer.add_field(name, ranking.num_keys, ranking.oov_id, ranking.pieces())
        sizes[name], oov_ids[name], id_counts[name] = ranking.num_keys + 1, ranking.oov_id, ranking.runs()
        distinct[name] = ranking.num_keys + ranking.rare_keys
    writer.close()
    return {"vocab_sizes": sizes, "oov_ids": oov_ids, "id_counts": id_counts, "distinct_values": distinct}


class _FieldRanking:
    """One field's ranks, from its ranges' histograms of counts (levels)."""

    def __init__(self, work: Path, parts: list[MergeTask], missing: int):
        self.paths = [spill_path(work, t) for t in parts]
        hists, rare, self.rare_keys = [], 0, 0
        for path in self.paths:
            with np.load(path) as z:
                hists.append((z["levels"], z["level_sizes"]))
                rare += int(z["rare"])
                self.rare_keys += int(z["rare_keys"])
        self.oov_count = missing + rare
        self.levels = np.unique(np.concatenate([h[0] for h in hists]))[::-1]  # counts, descending
        self.sizes = np.zeros((len(hists), self.levels.size), np.int64)  # [range, level]: keys
        for r, (levels, level_sizes) in enumerate(hists):
            self.sizes[r, self._level(levels)] = level_sizes
        per_level = self.sizes.sum(axis=0)
        larger = np.cumsum(per_level) - per_level  # keys with a larger count
        # first id of each (range, level): larger counts, then this level's lower ranges
        self.first_id = larger + np.cumsum(self.sizes, axis=0) - self.sizes
        self.num_keys = int(per_level.sum())
        self.oov_id = int(per_level[self.levels > self.oov_count].sum())
        self.per_level = per_level

    def _level(self, counts: np.ndarray) -> np.ndarray:
        return np.searchsorted(-self.levels, -counts)

    def pieces(self):
        """``(keys, ids)`` per range, ranges in key order."""
        for r, path in enumerate(self.paths):
            with np.load(path) as z:
                keys, counts = z["keys"], z["counts"]
            level = self._level(counts)
            order = np.argsort(level, kind="stable")  # by level, then key (keys ascending)
            level_start = np.cumsum(self.sizes[r]) - self.sizes[r]  # in this range, by level
            sorted_level = level[order]
            within = np.arange(order.size) - level_start[sorted_level]
            ids = np.empty(order.size, np.int32)
            ids[order] = (self.first_id[r, sorted_level] + within
                          + (self.levels[sorted_level] <= self.oov_count))
            yield keys, ids

    def runs(self) -> list[list[int]]:
        """Run-length encoded counts by id: the levels, OOV joining or adding its own."""
        runs = [[int(c), int(n)] for c, n in zip(self.levels, self.per_level)]
        at = int(np.searchsorted(-self.levels, -self.oov_count))
        if at < len(runs) and runs[at][0] == self.oov_count:
            runs[at][1] += 1
        else:
            runs.insert(at, [int(self.oov_count), 1])
        return runs
