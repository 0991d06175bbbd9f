"""Retrain (fine-tune) the shipped model: a run's weights, repacked into the mixed-width
tables of its structured prune, trained again with early stopping.

    python -m launch.prune --run-dir runs/synthetic/search --cr 10
    python -m launch.retrain --run-dir runs/synthetic/search --out runs/synthetic/retrain

The source run directory holds ``prune.json`` and decides where the weights come from:

- a search run (``blocking.json``): its best checkpoint, α folded into the values;
- a plain train run (magnitude pruning, ``dnis prune`` on it): its best checkpoint;
- ``--init scratch``: nothing is loaded; the plan is trained from the tables' own
  initialisation (the plans of ``dnis compare``'s baselines, MDE and random search).

The new run directory gets the usual config, metrics, checkpoints and ``result.json``
with the test metrics before retraining (the pruned model as repacked: equal to the
structurally pruned model) and after, and ``model/``: the best model exported for
serving (``launch.export``; not for a multi-hot run, whose batches take ``KeyRewriter``'s
bags while serving is single-hot). Rank 0 reads the source's tables whole to repack
them (memory: one copy of the unpruned tables on that host).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from launch import run_as_process
from launch.common import Job, add_run_options, evaluate_test_split, fit, new_run, open_job, shard_run_task
from launch.export import export_best
from pipeline.config import load_config
from pipeline.evaluate import evaluate
from pipeline.loop import BEST
from pipeline.prune.basis import basis_from_json
from pipeline.run_dir import RunDir
from pipeline.tasks import RunTask, build_retrain_task, build_search_task, build_train_task
from plans.blocking import Blocking
from plans.structured import StructuredPlan
from sharding.checkpoint import latest_checkpoint, load_checkpoint, load_full_state
from sharding.dmp import barrier, init_distributed
from sharding.field_embedding import table_name
from sharding.repack import PROJECTIONS, repacked_weights, rotated_projections

INIT_FILE = "init.pt"
INITS = ("source", "scratch")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a run with prune.json (dnis prune, or a baseline plan)")
    parser.add_argument("--out", help="the retrain run directory (default: <run-dir>/retrain)")
    parser.add_argument(
        "--projection", choices=PROJECTIONS,
        help="fixed selection or learned ME projection (default: the one prune.json was sized for)",
    )
    parser.add_argument(
        "--init", choices=INITS, default="source",
        help="source: the run's best weights repacked; scratch: the tables' own initialisation",
    )
    add_run_options(parser)
    return parser.parse_args(argv)


def initial_state(
    job: Job, source: RunDir, plan: StructuredPlan, rotations: Optional[dict] = None
) -> dict[str, torch.Tensor]:
    """The source run's best checkpoint, repacked by ``plan`` (see ``repacked_state``):
    a search's α-model, or a plain model (α = 1, magnitude pruning)."""
    if (source.path / "blocking.json").is_file():
        blocking = Blocking.from_json(source.read_json("blocking.json"))
        task = build_search_task(job.cfg, job.layout, blocking, torch.device("cpu"))
    else:
        task = build_train_task(job.cfg, job.layout, torch.device("cpu"))
    load_checkpoint(source.checkpoints / BEST, task, local=True)
    return repacked_state(task, plan, job.layout.keys, rotations)


def repacked_state(
    task: nn.Module, plan: StructuredPlan, keys: Sequence[str], rotations: Optional[dict] = None
) -> dict[str, torch.Tensor]:
    """A search or train task's dense weights and its tables repacked by ``plan`` (a
    search's α folded into the values; with ``rotations``, turned into each feature's
    principal basis and the learned projections turned back), keyed like the retrain
    task's state dict."""
    embedding = task.model.embedding
    tables = {k: embedding.ebc.embedding_bags[table_name(k)].weight.detach() for k in keys}
    alpha = getattr(embedding, "alpha", None)
    if alpha is None:  # a plain model: every column counts fully
        alpha = torch.ones(plan.num_alpha_rows, plan.embedding_dim)
    state = {
        f"model.{name}": value for name, value in task.model.state_dict().items()
        if not name.startswith("embedding.")
    }
    for name, values in repacked_weights(plan, keys, tables, alpha.detach(), rotations).items():
        state[f"model.embedding.ebc.embedding_bags.{name}.weight"] = values
    for key, projection in (rotated_projections(plan, keys, rotations) if rotations else {}).items():
        state[f"model.embedding.projections.{key}"] = projection
    return state


def initialise(job: Job, dmp, source: RunDir, plan: StructuredPlan, rotations: Optional[dict]) -> None:
    """Rank 0 repacks the source run's weights into ``init.pt``; every rank loads its shards."""
    path = job.run.path / INIT_FILE
    if job.env.is_main:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(initial_state(job, source, plan, rotations), tmp)
        os.replace(tmp, path)
    barrier()
    load_full_state(dmp, torch.load(path, weights_only=True))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    env = init_distributed()
    source = RunDir(args.run_dir, is_main=False)
    if not (source.path / "prune.json").is_file():
        raise SystemExit(f"{source.path}: no prune.json; run `dnis prune --run-dir {source.path} --cr N` first")
    if args.init == "source" and not (source.checkpoints / BEST).exists():
        raise SystemExit(f"{source.path}: no {BEST} checkpoint to start from; train it, or pass --init scratch")
    pruned = source.read_json("prune.json")
    plan = StructuredPlan.from_json(pruned["plan"])
    if not any(g.width for g in plan.groups):
        raise SystemExit(f"dnis retrain: {source.path / 'prune.json'} keeps no column of any group: nothing to train")
    projection = args.projection or pruned["projection"]
    rotations = basis_from_json(pruned["rotations"]) if "rotations" in pruned else None
    if rotations is not None and projection != "learned":
        raise SystemExit(f"dnis retrain: {source.path / 'prune.json'} prunes principal columns (--basis principal); "
                         "only the learned projection maps them back")
    out = args.out or str(Path(args.run_dir) / "retrain")
    cfg = load_config([source.path / "config.yaml"], [*args.set, f"run.dir={out}"])
    job = open_job(env, cfg, new_run(env, cfg, args.resume), show_progress=not args.no_progress)
    # The retrain run directory stands alone (evaluate, inference): its plan and its origin.
    job.run.write_json("prune.json", {
        **pruned, "projection": projection, "search_run": str(source.path), "init": args.init,
    })
    task = build_retrain_task(cfg, job.layout, plan, projection, torch.device("meta"))
    dmp, optimizer = shard_run_task(job, RunTask(task, plan=plan, projection=projection))
    if args.init == "source" and not (args.resume and latest_checkpoint(job.run.checkpoints)):
        initialise(job, dmp, source, plan, rotations)  # a resumed run takes its weights from the checkpoint
    before = evaluate(dmp, job.reader("test", train=False).batches(), env.device, desc="test")
    job.log(f"before retraining: test auc {before['auc']:.5f} logloss {before['logloss']:.5f}")
    train = job.reader("train", train=True)
    fit(
        job, dmp, optimizer, lambda epoch, start, _: train.batches(epoch, start),
        train.num_batches(), resume=args.resume, validate_first=True,
    )
    extra = {
        "before_retrain": before, "projection": projection,
        "compression_ratio": plan.compression_ratio(projection),
        "embedding_bytes": plan.embedding_bytes(projection), "unpruned_bytes": plan.unpruned_bytes(),
    }
    metrics = evaluate_test_split(job, dmp, "retrain", extra)
    if env.is_main:  # the run ships: its best model as a weights-only artifact
        job.log(export_best(job.run.path, cfg))
    barrier()
    return metrics


if __name__ == "__main__":
    run_as_process(main)
