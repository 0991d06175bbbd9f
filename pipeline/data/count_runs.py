"""Pass 1's train counts of one chunk, kept within a key budget by spilling sorted *runs*.

A chunk's counts are summed per field in memory; when they hold more than ``max_keys``
entries they are compacted (pending pairs summed), and if more than half of that remain,
every field's distinct keys (ascending) and counts are written as run ``r`` of the
chunk, ``_work/counts/<chunk>/<r>.keys.npy`` / ``.counts.npy`` (fields back to back), and
counting starts empty. A key may so appear in several runs of a chunk:
the merge (``count_merge``) sums runs like it sums chunks. A ``.gz`` day is one chunk;
with tens of millions of distinct values it spills many runs instead of growing.

Example: 5M distinct values in one field under ``max_keys = 700_000`` spill 7 runs of
about 700k keys each and a last one with the rest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

# Peak bytes per held entry (key + count, summed or pending) while the accumulators compact:
# the concatenated entries and np.unique's copy, sort and inverse. tracemalloc measured 75
# to 79 with 2M to 4M entries in one field (82 before pending pairs were freed earlier);
# tests/test_count_merge.py checks the bound.
COUNT_BYTES_PER_KEY = 80


class CountAccumulator:
    """Sums ``(keys, counts)`` pairs; memory stays near the number of distinct keys."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0

    @property
    def size(self) -> int:
        """Entries held: distinct keys summed so far plus pairs not summed yet."""
        return self.keys.size + self.pending_size

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.pending.append((np.asarray(keys, np.int64), np.asarray(counts, np.int64)))
        self.pending_size += len(keys)
        if self.pending_size > max(2 * self.keys.size, 1 << 20):
            self.reduce()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct keys and their summed counts."""
        self.reduce()
        return self.keys, self.counts

    def reduce(self) -> None:
        """Sum the pending pairs into the distinct keys."""
        if not self.pending:
            return
        keys = np.concatenate([self.keys] + [k for k, _ in self.pending])
        counts = np.concatenate([self.counts] + [c for _, c in self.pending])
        self.pending, self.pending_size = [], 0
        self.keys, inverse = np.unique(keys, return_inverse=True)
        del keys
        self.counts = np.bincount(inverse, weights=counts, minlength=self.keys.size).astype(np.int64)


def runs_dir(work: Path, chunk_id: str) -> Path:
    return work / "counts" / chunk_id


def run_file(work: Path, chunk_id: str, run: int, name: str) -> Path:
    """Run ``run``'s ``keys`` or ``counts`` file of a chunk."""
    return runs_dir(work, chunk_id) / f"{run:05d}.{name}.npy"


class CountRuns:
    """One chunk's counts per field, written as runs whenever they hold too many entries.

    Args:
        work: the work dir; runs go to ``runs_dir(work, chunk_id)``, emptied first so that
            a killed attempt's runs are never counted.
        chunk_id: the chunk.
        num_fields: fields counted.
        max_keys: entries held (all fields) past which the counts compact, and spill if
            they still hold more than half of it.
    """

    def __init__(self, work: Path, chunk_id: str, num_fields: int, max_keys: int):
        self.work, self.chunk_id, self.max_keys = work, chunk_id, max_keys
        shutil.rmtree(runs_dir(work, chunk_id), ignore_errors=True)
        runs_dir(work, chunk_id).mkdir(parents=True)
        self.accs = [CountAccumulator() for _ in range(num_fields)]
        self.sizes: list[list[int]] = []  # per run, keys per field

    @property
    def size(self) -> int:
        return sum(acc.size for acc in self.accs)

    def add(self, field: int, keys: np.ndarray, counts: np.ndarray) -> None:
        """Count ``keys`` of field number ``field`` ``counts`` times more; may spill a run."""
        self.accs[field].add(keys, counts)
        if self.size > self.max_keys:
            for acc in self.accs:
                acc.reduce()
            # spilling at half leaves room for half the budget of new entries before the next
            # compaction, so re-sorting the held keys costs O(log) per entry, not O(held)
            if self.size > self.max_keys // 2:
                self.spill()

    def spill(self) -> None:
        """Write every field's sorted keys and counts as the next run; start empty."""
        keys, counts = zip(*(acc.result() for acc in self.accs))
        run = len(self.sizes)
        for name, parts in (("keys", keys), ("counts", counts)):  # fields back to back, mmap-able
            path = run_file(self.work, self.chunk_id, run, name)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, np.concatenate(parts))
            os.replace(tmp, path)
        self.sizes.append([k.size for k in keys])
        self.accs = [CountAccumulator() for _ in self.accs]

    def close(self) -> dict[str, np.ndarray]:
        """Spill the last run; returns ``sizes`` and ``offsets`` ([run, field]) for the
        chunk's ``.npz``."""
        self.spill()
        sizes = np.array(self.sizes, dtype=np.int64)
        return {"sizes": sizes, "offsets": np.c_[np.zeros(len(sizes), np.int64), np.cumsum(sizes, axis=1)]}
