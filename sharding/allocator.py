"""Keep freed memory in glibc malloc's heap, as jemalloc or tcmalloc would.

Left to glibc's defaults, a tensor above the dynamic mmap threshold is a fresh mapping
that page-faults on first touch and is unmapped when freed. A training step frees and
reallocates the same large tensors every step (a search batch's pooled embeddings,
5120 × 1,664 floats: 34 MB), so each costs page faults and system time again: a 34 MB
``cat`` took 17.9 ms against 2.6 ms from reused heap (one thread), and a plain 2-rank
step 398 against 338 ms. Training ranks call ``keep_freed_memory`` when they join the
job (``sharding.dmp.init_distributed``); the serving benchmark calls it too, so its
ratios do not move with the allocator's state. Preprocessing does not: it bounds its
memory (``--memory-mb``) and its workers hand freed memory back between passes
(``pipeline.data.workers``).
``tests/test_allocator.py`` checks it on a 128 MiB tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Serve every block from the heap (no per-block mappings) and keep up to 1 GiB of
    freed memory there; ``False`` where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))
