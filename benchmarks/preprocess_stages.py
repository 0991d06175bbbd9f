"""Peak RSS of each ``dnis-preprocess`` stage, run one after the other in this process.

    python benchmarks/preprocess_stages.py --output OUT [dnis-preprocess options] INPUT...

Every stage runs here with one worker (``--workers 1`` is appended), and the high-water
mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` before each, so a stage's peak
is its own, on top of whatever earlier stages left allocated. Prints one line per stage
(wall and CPU seconds, peak RSS MiB) and the runs pass 1 spilled; leaves OUT unfinished (its
``_work/``; ``dnis-preprocess`` with the same options finishes it). Linux only. Set
``MALLOC_TRIM_THRESHOLD_=131072 MALLOC_MMAP_THRESHOLD_=131072 ARROW_DEFAULT_MEMORY_POOL=system``
to have freed memory returned, so that a stage does not inherit an earlier one's heap.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.data import preprocess
from pipeline.data.workers import WorkerPool


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def main(argv: list[str]) -> None:
    opts = preprocess.parse_args(argv + ["--workers", "1", "--no-progress"], 1)
    if Path(opts.output).exists():  # a resumed output would skip the finished stages
        raise SystemExit(f"preprocess_stages: error: {opts.output} exists; give a new directory")
    preprocess.prepare(opts)
    chunks = preprocess.load_chunks(opts)
    print(f"after imports: peak RSS {peak_rss_mib():.0f} MiB")
    with WorkerPool(1) as pool:
        stages = {
            "pass 1 (count)": lambda: preprocess.count_chunks(chunks, opts, pool, False),
            "sum counts": lambda: preprocess.sum_counts(chunks, opts, pool, 0, 1, False),
            "merge (vocabulary)": lambda: preprocess.merge_counts(chunks, opts),
            "pass 2 (write)": lambda: preprocess.write_chunks(chunks, opts, pool, False),
        }
        for name, stage in stages.items():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            start, cpu = time.perf_counter(), time.process_time()
            stage()
            print(f"{name}: {time.perf_counter() - start:.1f} s (CPU {time.process_time() - cpu:.1f} s), "
                  f"peak RSS {peak_rss_mib():.0f} MiB", flush=True)
            if name.startswith("pass 1"):
                runs = list((Path(opts.output) / "_work" / "counts").rglob("*.keys.npy"))
                print(f"  {len(chunks)} chunk(s), {len(runs)} count run(s)")


if __name__ == "__main__":
    main(sys.argv[1:])
