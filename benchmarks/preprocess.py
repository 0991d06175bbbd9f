"""Our Criteo preprocessing vs TorchRec's own Criteo path, and our peak memory.

    python benchmarks/preprocess.py [--rows 2000000] [--min-count 3] [--workers N] [--quick]
    python benchmarks/preprocess.py --memory-only --one-chunk --rows 4000000 --row-group-rows 2000 --distinct

TorchRec side (installed torchrec): ``BinaryCriteoUtils.tsv_to_npys`` (TSV -> dense,
sparse, label .npy) then ``BinaryCriteoUtils.sparse_to_contiguous`` with the same
frequency threshold (what its ``contiguous_preproc_criteo`` script runs). It is one
process; ours uses ``--workers`` processes. Each side runs in its own subprocess; peak
RSS is the largest single process of its tree (``wait4`` rusage, which covers reaped
workers) and the sampled sum over the tree (``/proc``, workers running together).
CPU seconds are the tree's user + system time (the 2 cores may be shared: rows per CPU
second is the number that does not depend on the load; rows/s/core divides by wall).

Then the memory table: ours with ``--memory-mb`` (default 256, which also caps pass 2's
row groups) on 1/4, 1/2 and all of ``--rows`` (peak RSS must not grow with the input), and on narrow rows whose C1 takes
``--distinct`` values (1M and 5M; must not grow with the distinct values either), the
largest also as one ``.gz`` file (one chunk, whose pass-1 counts spill in runs).
``--quick`` divides every size by 8. ``--memory-only`` skips the TorchRec comparison;
``--one-chunk`` gzips the 1/4, 1/2 and all-rows inputs, so that each is one chunk whose
shards take all its rows (a Terabyte day's shape), and ``--row-group-rows`` makes its row
groups smaller, so that a small input holds as many as a large one would (the parquet
footer grows per row group); ``--distinct`` with no value skips the narrow files.

Prints the tables and ``ratio <ours rows/s per core / torchrec rows/s per core>``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TORCHREC = """
import sys
from torchrec.datasets.criteo import BinaryCriteoUtils
src, work, threshold = sys.argv[1], sys.argv[2], int(sys.argv[3])
BinaryCriteoUtils.tsv_to_npys(src, f"{work}/day_0_dense.npy", f"{work}/day_0_sparse.npy",
                              f"{work}/day_0_labels.npy", dataset_name="criteo_kaggle")
BinaryCriteoUtils.sparse_to_contiguous([f"{work}/day_0_sparse.npy"], work, frequency_threshold=threshold)
"""


def tree_rss(pid: int) -> dict[int, int]:
    """RSS (bytes) of ``pid`` and of each of its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        tree[p] = rss.get(p, 0)
        todo += children.get(p, [])
    return tree


def peak_rss(pid: int) -> tuple[int, str]:
    """High-water RSS (bytes, ``VmHWM``) of a live process and its command line."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return hwm, f.read().replace(b"\0", b" ").decode().strip()
    except (OSError, StopIteration):  # gone, or a zombie
        return 0, ""


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds, peak single-process and summed tree RSS, and
    ``peaks``: each process's high-water RSS by command line (sampled every 50 ms, so a
    process's last 50 ms may be missed)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_sum = [0]
    peaks: dict[int, tuple[int, str]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            tree = tree_rss(proc.pid)
            peak_sum[0] = max(peak_sum[0], sum(tree.values()))
            for p in tree:
                hwm, command = peak_rss(p)
                if hwm > peaks.get(p, (0,))[0]:
                    peaks[p] = (hwm, command)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "max_rss": usage.ru_maxrss * 1024, "sum_rss": peak_sum[0], "output": output,
            "peaks": list(peaks.values())}


def distinct_file(distinct: int, path: Path) -> None:
    """Narrow Criteo rows (only label and C1 set): C1 takes ``distinct`` values, one per row."""
    if path.exists():
        return
    import numpy as np

    rng = np.random.default_rng(0)
    values = rng.permutation(np.unique(rng.integers(0, 2**32, distinct + distinct // 50 + 100))[:distinct])
    rest = "\t" * 25
    with open(path, "w") as f:
        for start in range(0, distinct, 1 << 20):
            f.write("".join(f"{i % 2}{chr(9) * 14}{v:08x}{rest}\n"
                            for i, v in enumerate(values[start : start + (1 << 20)].tolist())))


def gzip_file(src: Path, path: Path) -> None:
    """``src`` compressed (level 1: the input's size matters here, not its ratio)."""
    if not path.exists():
        with open(src, "rb") as f, gzip.open(path, "wb", compresslevel=1) as out:
            shutil.copyfileobj(f, out, 1 << 20)


def synth(rows: int, path: Path) -> None:
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pipeline.data.synth", "--rows", str(rows), "--out",
                        str(path), "--seed", "0", "--truth", str(path) + ".truth.json"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def table(title: str, results: dict) -> None:
    print(title)
    print(f"{'run':<34}{'wall s':>8}{'cpu s':>8}{'cores':>6}{'rows/s/core':>13}{'rows/cpu-s':>12}"
          f"{'max RSS MiB':>13}{'sum RSS MiB':>13}")
    for name, r in results.items():
        r["per_core"] = r["rows"] / r["wall"] / r["cores"]
        print(f"{name:<34}{r['wall']:>8.1f}{r['cpu']:>8.1f}{r['cores']:>6}{r['per_core']:>13,.0f}"
              f"{r['rows'] / r['cpu']:>12,.0f}{r['max_rss'] / 2**20:>13,.0f}{r['sum_rss'] / 2**20:>13,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--min-count", type=int, default=3, help="our --min-count = TorchRec's frequency_threshold")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--memory-mb", type=int, default=256, help="our --memory-mb in the memory table")
    p.add_argument("--distinct", type=int, nargs="*", default=[1_000_000, 5_000_000],
                   help="distinct C1 values of the memory table's narrow files (none: no narrow files)")
    p.add_argument("--memory-only", action="store_true", help="the memory table only (no TorchRec run)")
    p.add_argument("--one-chunk", action="store_true",
                   help="the memory table's sized inputs as one .gz each (one chunk: its shards get all rows)")
    p.add_argument("--row-group-rows", type=int, default=None,
                   help="our --row-group-rows in the memory table (default: what --memory-mb allows)")
    p.add_argument("--quick", action="store_true", help="every size / 8")
    p.add_argument(
        "--dir", default=str(Path(tempfile.gettempdir()) / "dnis-preprocess-bench"),
        help="scratch directory (input files are reused between runs)",
    )
    args = p.parse_args()
    scale = 8 if args.quick else 1
    rows, distinct = args.rows // scale, [d // scale for d in args.distinct]
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)

    def ours(src: Path, n: int, *extra: str, min_count: int = args.min_count) -> dict:
        out = work / f"ours_{src.stem}"
        cmd = [sys.executable, "-m", "pipeline.data.preprocess", "--output", str(out), "--dataset",
               "synthetic", "--min-count", str(min_count), "--workers", str(args.workers),
               "--no-progress", "--overwrite", *extra, str(src)]
        subprocess.run(["rm", "-rf", str(out)], check=True)
        return {**measure(cmd), "rows": n, "cores": args.workers}

    if not args.memory_only:
        speed_table(work, rows, args, ours)

    budget = ["--memory-mb", str(args.memory_mb)]
    if args.row_group_rows:
        budget += ["--row-group-rows", str(args.row_group_rows)]
    memory = {}
    for n in (rows // 4, rows // 2, rows):
        src = work / f"criteo_{n}.txt"
        synth(n, src)
        if args.one_chunk:
            gzip_file(src, work / f"criteo_{n}.txt.gz")
            src = work / f"criteo_{n}.txt.gz"
        memory[f"{n:,} rows" + (", one .gz" if args.one_chunk else "")] = ours(src, n, *budget)
        print(f"  {n:,} rows: {memory_line(memory, work, src)}", flush=True)
    for d in distinct:
        src = work / f"distinct_{d}.txt"
        distinct_file(d, src)
        memory[f"C1 {d:,} distinct (min-count 1)"] = ours(src, d, *budget, min_count=1)
    if distinct:
        gz = work / f"distinct_{distinct[-1]}.txt.gz"
        gzip_file(work / f"distinct_{distinct[-1]}.txt", gz)
        memory[f"C1 {distinct[-1]:,} distinct, one .gz"] = ours(gz, distinct[-1], *budget, min_count=1)
    table(f"memory: ours, {' '.join(budget)} (max RSS = largest single process)", memory)


def memory_line(memory: dict, work: Path, src: Path) -> str:
    """Peak RSS of the last run and the shape of what it wrote: files and row groups per split."""
    import pyarrow.parquet as pq

    from pipeline.data.metadata import DatasetMeta

    out = work / f"ours_{src.stem}"
    meta = DatasetMeta.load(out)
    shape = ", ".join(f"{s} {len(fs)} file(s) / {sum(pq.ParquetFile(out / f).metadata.num_row_groups for f in fs)} "
                      "row groups" for s, fs in meta.files.items())
    return f"max RSS {list(memory.values())[-1]['max_rss'] / 2**20:.0f} MiB; {shape}"


def speed_table(work: Path, rows: int, args, ours) -> None:
    full = work / f"criteo_{rows}.txt"
    synth(rows, full)
    speed = {f"ours {rows:,} rows": ours(full, rows)}
    tr_dir = work / "torchrec"
    tr_dir.mkdir(exist_ok=True)
    speed[f"torchrec {rows:,} rows"] = {
        **measure([sys.executable, "-c", TORCHREC, str(full), str(tr_dir), str(args.min_count)]),
        "rows": rows, "cores": 1}
    print(f"input: {full} ({full.stat().st_size / 2**20:.0f} MiB), min_count {args.min_count}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    table("speed (both passes, parquet written)", speed)
    print(f"ours: {speed[f'ours {rows:,} rows']['output'].strip().splitlines()[-1]}")
    print(f"ratio {speed[f'ours {rows:,} rows']['per_core'] / speed[f'torchrec {rows:,} rows']['per_core']:.2f}")


if __name__ == "__main__":
    main()
