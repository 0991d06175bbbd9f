"""The Criteo Terabyte layout end to end at small scale, with one field of millions of values.

    python benchmarks/terabyte_e2e.py [--rows 6000000] [--memory-mb 256] [--min-count 3]
                                      [--steps 40] [--embedding-dim 128] [--dir DIR]

1. ``dnis-synth`` writes 24 gzip days; C1 gets a heavy tail (``--tail-rate`` of its rows
   draw from 2^30 values without label signal, Zipf 0.5: mostly singletons, as in the
   real days), so its train split holds millions of distinct values.
2. The ``preprocess`` TorchX component on 2 ranks (``--dataset criteo_1tb``,
   ``--memory-mb``, row groups of 200k rows or fewer if that budget caps them). Peak RSS
   per rank is its ``VmHWM``, sampled by ``benchmarks/preprocess.py``'s ``measure``;
   rows/s/core divides by wall and 2 cores.
3. The loader reads one batch of each split in ``configs/criteo_1tb.yaml``'s dense mode.
4. The ``search`` TorchX component on 2 ranks: ``configs/criteo_1tb.yaml`` (DCNv2, MLPerf
   sizes) shrunk by overrides: ``--steps`` steps of 256 train rows per rank (64 validation
   rows), and ``model.embedding_dim`` only when ``--embedding-dim`` differs from 128.

Prints one table: per phase, its wall seconds and what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from preprocess import REPO, measure

sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.features import FeatureLayout  # noqa: E402
from pipeline.data.loader import SplitReader  # noqa: E402
from pipeline.data.metadata import DatasetMeta  # noqa: E402
from pipeline.data.schema import SPLITS  # noqa: E402

DAYS = 24
WIDE = "C1"  # a 40M-row table in MLPerf's list, as C10, C20, C21, C22
CONFIG = REPO / "configs" / "criteo_1tb.yaml"
BIN = Path(sys.executable).parent


def torchx(component: str, *args: str) -> list[str]:
    """``torchx run`` of one of the project's components on 2 local ranks."""
    return [str(BIN / "torchx"), "run", "-s", "local_cwd", f"{REPO}/launch/components.py:{component}",
            "--nproc", "2", *args]


def rank_peak(result: dict, module: str) -> int:
    """Largest high-water RSS of the processes running ``module`` (the ranks, not torchrun)."""
    ranks = [hwm for hwm, command in result["peaks"] if f"-m {module}" in command and "torchrun" not in command]
    if not ranks:
        sys.exit(f"no {module} process was sampled")
    return max(ranks)


def synth(args: argparse.Namespace, raw: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline.data.synth", "--rows", str(args.rows), "--days", str(DAYS),
           "--gzip", "--vocab-scale", str(args.vocab_scale), "--tail-field", WIDE,
           "--tail-rate", str(args.tail_rate), "--out", str(raw)]
    result = measure(cmd)
    size = sum(p.stat().st_size for p in raw.glob("day_*.gz"))
    return {**result, "what": f"{args.rows:,} rows, {DAYS} days, {size / 2**20:,.0f} MiB gzip, "
                              f"vocab scale {args.vocab_scale}, {WIDE} tail rate {args.tail_rate}"}


def preprocess(args: argparse.Namespace, raw: Path, data: Path) -> dict:
    days = ",".join(str(raw / f"day_{d}.gz") for d in range(DAYS))
    result = measure(torchx("preprocess", "--output", str(data), "--inputs", days, "--dataset", "criteo_1tb",
                            "--min_count", str(args.min_count), "--memory_mb", str(args.memory_mb),
                            "--row_group_rows", "200000"))
    meta = DatasetMeta.load(data)
    rows = meta.rows["read"]
    ids = sum(meta.vocab_sizes[f] for f in meta.sparse_fields)
    return {**result, "what": (
        f"{rows:,} rows ({meta.rows['train']:,} train), {rows / result['wall'] / 2:,.0f} rows/s/core; "
        f"{WIDE}: {meta.distinct_values[WIDE]:,} distinct train values, {meta.vocab_sizes[WIDE]:,} ids "
        f"after min-count {args.min_count} (all fields {ids:,}); peak RSS per rank "
        f"{rank_peak(result, 'launch.preprocess') / 2**20:,.0f} MiB (budget {args.memory_mb} MiB), "
        f"whole tree {result['sum_rss'] / 2**20:,.0f} MiB")}


def loader(data: Path) -> dict:
    start = time.perf_counter()
    meta = DatasetMeta.load(data)
    layout = FeatureLayout.from_meta(meta, load_config([CONFIG]).data.dense_mode)
    shapes = []
    for split in SPLITS:
        reader = SplitReader(data, split, layout, batch_size=4096, shuffle=False, drop_last=False, prefetch=0)
        batch = next(iter(reader.batches()))
        shapes.append(f"{split} {tuple(batch.dense.shape)} dense, {len(batch.sparse.keys())} sparse keys")
    return {"wall": time.perf_counter() - start, "what": "; ".join(shapes)}


def search(args: argparse.Namespace, data: Path, run_dir: Path) -> dict:
    overrides = [f"data.path={data}", f"run.dir={run_dir}", "data.batch_size=256", "data.eval_batch_size=4096",
                 "search.val_batch_size=64", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                 f"train.checkpoint_every={args.steps}", f"train.log_every={args.steps}",
                 "train.eval_max_batches=4"]
    if args.embedding_dim != 128:
        overrides.append(f"model.embedding_dim={args.embedding_dim}")
    result = measure(torchx("search", "--config", str(CONFIG), "--overrides", ",".join(overrides)))
    test = json.loads((run_dir / "result.json").read_text())["test"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = max(e["step"] for e in events if "step" in e)
    return {**result, "what": f"{steps} steps, K={args.embedding_dim}, test AUC {test['auc']:.4f} "
                              f"on {test['rows']:,} rows; peak RSS per rank "
                              f"{rank_peak(result, 'launch.search') / 2**20:,.0f} MiB"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=6_000_000, help="rows over the 24 days")
    p.add_argument("--tail-rate", type=float, default=0.9, help=f"share of rows whose {WIDE} is a tail value")
    p.add_argument("--vocab-scale", type=float, default=0.25, help="dnis-synth --vocab-scale (other fields)")
    p.add_argument("--memory-mb", type=int, default=256, help="preprocess --memory-mb")
    p.add_argument("--min-count", type=int, default=3, help="preprocess --min-count")
    p.add_argument("--steps", type=int, default=40, help="search steps")
    p.add_argument("--embedding-dim", type=int, default=128, help="K (criteo_1tb.yaml: 128)")
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "dnis-terabyte-e2e"),
                   help="scratch directory (emptied first)")
    args = p.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # torchx's local scheduler runs torchrun from PATH
    phases = {
        "synth (1 process)": synth(args, work / "raw"),
        "preprocess (TorchX, 2 ranks)": preprocess(args, work / "raw", work / "data"),
        "loader (one batch per split)": loader(work / "data"),
        "search (TorchX, 2 ranks)": search(args, work / "data", work / "search"),
    }
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'phase':<30}{'wall s':>8}  measured")
    for name, r in phases.items():
        print(f"{name:<30}{r['wall']:>8.1f}  {r['what']}")


if __name__ == "__main__":
    main()
