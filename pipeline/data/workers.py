"""The worker processes of ``dnis-preprocess``'s chunk passes.

Each call of a pass hands back the memory it freed (``release_freed_memory``) before the
next starts: glibc and pyarrow otherwise keep freed heap for reuse, and a process that
counted a large chunk carried pass 1's high-water mark into the stages after it.
Measured on a one-chunk ``.gz`` of 5M distinct values at ``--memory-mb 256``
(``benchmarks/preprocess_stages.py``): the count sum 222 -> 161 MiB, the merge 250 ->
188 MiB. Pass 2's peak is its own, and within the budget since its row groups and
vocabulary slices are sized from it (``preprocess.Options.context``): 680 -> 213 MiB on
5M synthetic rows with 5M distinct C1 values, 954 -> 219 MiB on twice that input.
"""

from __future__ import annotations

import ctypes
import functools
import ctypes.util
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, Callable, Optional

import pyarrow as pa

from pipeline.progress import progress_bar


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, looked up once per process (``find_library`` runs
    ``ldconfig``); None where the C library has none."""
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_freed_memory() -> None:
    """Return freed heap to the OS: pyarrow's pool, then ``malloc_trim``."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _run_and_release(fn: Callable[[Any], Any], item: Any) -> Any:
    try:
        return fn(item)
    finally:
        release_freed_memory()


class WorkerPool:
    """``workers`` spawned processes kept for every stage of a run (a spawn costs an
    interpreter and the numpy/pyarrow imports, about 0.5 CPU s), started on first need."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn: Callable, items: list, sizes: list[int], desc: str, show: bool) -> None:
        """``fn(item)`` for every item; ``sizes`` drive the progress bar."""
        bar = progress_bar(total=sum(sizes), unit="B", unit_scale=True, desc=desc, disable=not show,
                           file=sys.stderr)
        if min(self.workers, len(items)) <= 1:
            for item, size in zip(items, sizes):
                _run_and_release(fn, item)
                bar.update(size)
        else:
            if self.pool is None:  # spawn: safe whatever threads the parent runs (gloo under torchrun)
                self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
            futures = {self.pool.submit(_run_and_release, fn, item): size for item, size in zip(items, sizes)}
            for future in as_completed(futures):
                future.result()
                bar.update(futures[future])
        bar.close()
