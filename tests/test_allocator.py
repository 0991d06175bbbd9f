"""``sharding.allocator``: a large tensor comes from malloc's heap and its memory stays
there when freed (glibc), instead of a fresh mapping per tensor."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import re, sys, torch
from sharding.allocator import keep_freed_memory

def heap_mib():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return (hi - lo) / 2**20
    return 0.0

if sys.argv[1] == "keep" and not keep_freed_memory():
    print("not glibc"); sys.exit(0)
before = heap_mib()
t = torch.ones(32 << 20)  # 128 MiB
del t
print(heap_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_freed_128_mib_tensor_stays_in_the_heap_only_when_asked():
    def heap_growth(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                              check=True).stdout.strip()

    kept = heap_growth("keep")
    if kept == "not glibc":
        pytest.skip("mallopt is glibc's")
    assert float(kept) > 120  # served from the heap and kept there after the free
    assert float(heap_growth("default")) < 1  # glibc's default: a mapping, unmapped again
