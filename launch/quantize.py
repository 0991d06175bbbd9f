"""Quantize a finished run's tables row-wise to INT8 or INT4 and evaluate it, in one process.

    python -m launch.quantize --run-dir runs/synthetic --bits 8
    dnis quantize --run-dir runs/synthetic/search/retrain --bits 4 --split test

Post-training quantisation (TorchRec's ``quantize_inference_model``, as served by
``pipeline.inference.serve_artifact``) of a plain train run (the full tables: the baseline)
or of a retrain run (the repacked DNIS model: pruning and quantisation compound). No
process group: the model is rebuilt on the CPU from the run's config and checkpoint and
scored on the dataset's split through the project's loader and ``pipeline.evaluate``, the
metrics of every other stage: the model as served (``ServingModel.rank_logits``: a
repacked model's serving ids, its interaction folded where served so).

Writes ``quantized_int{bits}.json`` (``quantized_int{bits}_{split}.json`` for another
split) into the run directory, atomically: the split's auc/logloss/rows, the stored
bytes of the quantized tables (``plans.bytes``: packed values + fp16 scale and
bias per row, fp32 rows for a slab too narrow to quantize; a repacked model's range
starts and projections as its prune plan counts them), the unpruned fp32 bytes, their
ratio and the stage's wall time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from launch import run_as_process
from launch.common import open_job
from launch.export import load_run
from pipeline.config import load_config
from pipeline.evaluate import evaluate
from pipeline.inference.model import ServingModel, serve_artifact
from pipeline.loop import BEST
from pipeline.run_dir import RunDir
from pipeline.tasks import RunTask, TrainTask, build_run_task
from plans.bytes import QUANTIZED_BITS, quantized_table_bytes, unpruned_bytes
from sharding.dmp import DistEnv


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a finished train run or retrain run")
    parser.add_argument("--bits", type=int, required=True, choices=QUANTIZED_BITS, help="INT8 or INT4 rows")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--checkpoint", default=BEST, help="checkpoint name under <run-dir>/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def result_name(bits: int, split: str) -> str:
    """The result file of ``bits`` on ``split``, e.g. ``quantized_int8.json`` for the test split."""
    return f"quantized_int{bits}.json" if split == "test" else f"quantized_int{bits}_{split}.json"


def quantized_bytes(built: RunTask, num_embeddings: dict[str, int], embedding_dim: int, bits: int) -> tuple[int, int]:
    """``(embedding bytes at bits, unpruned fp32 bytes)`` of a run's tables: a repacked
    model's by its prune plan, full tables (one per feature, width K) otherwise."""
    if built.plan is not None:
        return built.plan.embedding_bytes(built.projection, bits), built.plan.unpruned_bytes()
    rows = list(num_embeddings.values())
    return int(quantized_table_bytes(rows, embedding_dim, bits).sum()), unpruned_bytes(sum(rows), embedding_dim)


class LoaderBatches(nn.Module):
    """``served`` as ``TrainTask`` calls a model: ``(dense, sparse) -> logits`` of the
    loader's batches (frequency ranks; ``ServingModel.rank_logits``)."""

    def __init__(self, served: ServingModel) -> None:
        super().__init__()
        self.served = served

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        return self.served.rank_logits(dense, sparse)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if not (Path(args.run_dir) / "config.yaml").is_file():
        raise SystemExit(f"{args.run_dir}: not a run directory (no config.yaml)")
    run = RunDir(args.run_dir)
    cfg = load_config([run.path / "config.yaml"])
    # One process that joins no job: the loader reads every row of the split as rank 0 of 1.
    job = open_job(DistEnv(0, 1, 0, torch.device("cpu"), None), cfg, run, show_progress=not args.no_progress)
    built = build_run_task(run.path, cfg, job.layout, torch.device("meta"))
    if built.blocking is not None:
        raise SystemExit(
            f"{run.path}: a search run (its tables are α-scaled); quantize a train run or a "
            "retrain run (dnis prune, then dnis retrain)"
        )
    try:
        served = serve_artifact(load_run(run.path, args.checkpoint), bits=args.bits)
    except ValueError as error:  # a table width FBGEMM cannot quantize to these bits, or no checkpoint
        raise SystemExit(f"dnis quantize: {error}") from None
    metrics = evaluate(
        TrainTask(LoaderBatches(served)), job.reader(args.split, train=False).batches(), job.env.device,
        show_progress=job.show_progress, desc=args.split,
    )
    stored, unpruned = quantized_bytes(built, job.layout.num_embeddings, cfg.model.embedding_dim, args.bits)
    result = {
        "stage": "quantize", "bits": args.bits, "split": args.split, "checkpoint": args.checkpoint,
        "source": "retrain" if built.plan is not None else "train", args.split: metrics,
        "embedding_bytes": stored, "unpruned_bytes": unpruned, "compression_ratio": unpruned / stored,
        "wall_s": job.wall_s,
    }
    run.write_json(result_name(args.bits, args.split), result)
    run.log("quantize", **result)
    job.log(
        f"INT{args.bits} {args.split}: auc {metrics['auc']:.5f} logloss {metrics['logloss']:.5f} "
        f"rows {metrics['rows']}; {stored:,} of {unpruned:,} fp32 embedding bytes, CR {unpruned / stored:.2f}; "
        f"{result['wall_s']} s"
    )
    return result


if __name__ == "__main__":
    run_as_process(main)
