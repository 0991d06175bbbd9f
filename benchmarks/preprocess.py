"""Our Criteo preprocessing vs TorchRec's own Criteo path, on one synthetic file.

    python benchmarks/preprocess.py [--rows 2000000] [--min-count 3] [--workers N]

TorchRec side (installed torchrec): ``BinaryCriteoUtils.tsv_to_npys`` (TSV -> dense,
sparse, label .npy) then ``BinaryCriteoUtils.sparse_to_contiguous`` with the same
frequency threshold (what its ``contiguous_preproc_criteo`` script runs). It is one
process; ours uses ``--workers`` processes. Each side runs in its own subprocess; peak
RSS is the largest single process of its tree (``wait4`` rusage, which covers reaped
workers) and the sampled sum over the tree (``/proc``, workers running together).
Ours also runs on half the rows: its peak memory follows the vocabulary, not the input.

Prints a table and ``ratio <ours rows/s per core / torchrec rows/s per core>``.
"""

from __future__ import annotations

import argparse
import os
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


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of ``pid`` and its descendants, from /proc."""
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
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds, peak single-process and summed tree RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_sum = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak_sum[0] = max(peak_sum[0], tree_rss(proc.pid))

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
            "max_rss": usage.ru_maxrss * 1024, "sum_rss": peak_sum[0], "output": output}


def synth(rows: int, path: Path) -> None:
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pipeline.data.synth", "--rows", str(rows), "--out",
                        str(path), "--seed", "0", "--truth", str(path) + ".truth.json"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--min-count", type=int, default=3, help="our --min-count = TorchRec's frequency_threshold")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument(
        "--dir", default=str(Path(tempfile.gettempdir()) / "dnis-preprocess-bench"),
        help="scratch directory (the input file is reused between runs)",
    )
    args = p.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    full, half = work / f"criteo_{args.rows}.txt", work / f"criteo_{args.rows // 2}.txt"
    synth(args.rows, full)
    synth(args.rows // 2, half)

    def ours(src: Path, rows: int) -> dict:
        cmd = [sys.executable, "-m", "pipeline.data.preprocess", "--output", str(work / f"ours_{rows}"),
               "--dataset", "synthetic", "--min-count", str(args.min_count), "--workers",
               str(args.workers), "--no-progress", "--overwrite", str(src)]
        subprocess.run(["rm", "-rf", str(work / f"ours_{rows}")], check=True)
        return {**measure(cmd), "rows": rows, "cores": args.workers}

    results = {f"ours {args.rows // 2:,} rows": ours(half, args.rows // 2),
               f"ours {args.rows:,} rows": ours(full, args.rows)}
    tr_dir = work / "torchrec"
    tr_dir.mkdir(exist_ok=True)
    results[f"torchrec {args.rows:,} rows"] = {
        **measure([sys.executable, "-c", TORCHREC, str(full), str(tr_dir), str(args.min_count)]),
        "rows": args.rows, "cores": 1}

    print(f"input: {full} ({full.stat().st_size / 2**20:.0f} MiB), min_count {args.min_count}, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<26}{'wall s':>8}{'cpu s':>8}{'cores':>6}{'rows/s':>11}{'rows/s/core':>13}"
          f"{'max RSS MiB':>13}{'sum RSS MiB':>13}")
    for name, r in results.items():
        r["per_core"] = r["rows"] / r["wall"] / r["cores"]
        print(f"{name:<26}{r['wall']:>8.1f}{r['cpu']:>8.1f}{r['cores']:>6}{r['rows'] / r['wall']:>11,.0f}"
              f"{r['per_core']:>13,.0f}{r['max_rss'] / 2**20:>13,.0f}{r['sum_rss'] / 2**20:>13,.0f}")
    ours_full = results[f"ours {args.rows:,} rows"]
    print(f"ours: {ours_full['output'].strip().splitlines()[-1]}")
    print(f"ratio {ours_full['per_core'] / results[f'torchrec {args.rows:,} rows']['per_core']:.2f}")


if __name__ == "__main__":
    main()
