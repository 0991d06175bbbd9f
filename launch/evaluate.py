"""Evaluate a finished run (train, search or retrain) on a split: AUC and logloss over all ranks.

    python -m launch.evaluate --run-dir runs/synthetic/search --split test
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from launch import run_as_process
from launch.common import add_run_options, load_run
from pipeline.evaluate import evaluate
from pipeline.loop import BEST
from sharding.dmp import init_distributed


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a run directory of train, search or retrain")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument(
        "--checkpoint", default=BEST,
        help="checkpoint name under <run-dir>/checkpoints ('latest' = the last periodic one)",
    )
    add_run_options(parser, resume=False)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    env = init_distributed()
    job, dmp, _ = load_run(env, args.run_dir, args.checkpoint, args.set, not args.no_progress)
    metrics = evaluate(
        dmp, job.reader(args.split, train=False).batches(), env.device,
        show_progress=job.show_progress, desc=args.split,
    )
    job.run.log("evaluate", split=args.split, checkpoint=args.checkpoint, **metrics)
    job.log(f"{args.split}: auc {metrics['auc']:.5f} logloss {metrics['logloss']:.5f} rows {metrics['rows']}")
    return metrics


if __name__ == "__main__":
    run_as_process(main)
