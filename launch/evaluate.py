"""Evaluate a finished run (train or search) on a split: AUC and logloss over all ranks.

    python -m launch.evaluate --run-dir runs/synthetic/search --split test
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from launch.common import open_job, shard
from pipeline.config import load_config
from pipeline.evaluate import evaluate
from pipeline.loop import BEST
from pipeline.run_dir import RunDir
from pipeline.search.blocking import Blocking
from pipeline.tasks import build_search_task, build_train_task
from sharding.checkpoint import latest_checkpoint, load_checkpoint
from sharding.dmp import init_distributed


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a run directory of train or search")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument(
        "--checkpoint", default=BEST,
        help="checkpoint name under <run-dir>/checkpoints ('latest' = the last periodic one)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a value of the run's config, e.g. --set data.eval_batch_size=4096",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    env = init_distributed()
    run = RunDir(args.run_dir, is_main=env.is_main)
    cfg = load_config([run.path / "config.yaml"], args.set)
    job = open_job(env, cfg, run, show_progress=not args.no_progress)
    meta_device = torch.device("meta")
    if (run.path / "blocking.json").is_file():
        blocking = Blocking.from_json(run.read_json("blocking.json"))
        task = build_search_task(cfg, job.layout, blocking, meta_device)
    else:
        task = build_train_task(cfg, job.layout, meta_device)
    dmp, _ = shard(job, task)
    path = latest_checkpoint(run.checkpoints) if args.checkpoint == "latest" else run.checkpoints / args.checkpoint
    if path is None:
        raise SystemExit(f"{run.checkpoints}: no periodic checkpoint to evaluate")
    load_checkpoint(path, dmp)
    metrics = evaluate(
        dmp, job.reader(args.split, train=False).batches(), env.device,
        show_progress=job.show_progress, desc=args.split,
    )
    run.log("evaluate", split=args.split, checkpoint=path.name, **metrics)
    job.log(f"{args.split}: auc {metrics['auc']:.5f} logloss {metrics['logloss']:.5f} rows {metrics['rows']}")
    return metrics


if __name__ == "__main__":
    main()
