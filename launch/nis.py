"""NIS-ME baseline (Neural Input Search, Joglekar et al. KDD'20) on sharded TorchRec tables.

    python -m launch.nis --config configs/synthetic.yaml --cr 10
    torchx run -s local_cwd launch/components.py:nis --config configs/synthetic.yaml --cr 10 --nproc 2

A weight-sharing supernet (the configured model on an α-EBC, DNIS's search task) trains
on the train split; α is not learned but set each episode to the 0/1 mask of the
architecture the controller sampled (``pipeline.search.nis``): per frequency block, how
many of the ``nis.dim_blocks`` dim blocks of ``K/S`` columns it keeps. The first
``nis.warmup_steps`` steps train with every block on. Early stopping and the best
checkpoint follow the supernet's validation loss under the episode's mask at that time.

Writes ``blocking.json``, ``nis.jsonl`` (one line per episode: step, architecture,
validation loss, bytes, reward, baseline), ``nis.json`` (the controller's final
probabilities and the architecture chosen: per block the most probable choice, shrunk
greedily until it fits ``unpruned / cr`` bytes), ``prune.json`` (that architecture as a
structured plan with learned projections, the format ``dnis prune`` writes) and
``result.json`` (test metrics of the supernet under the chosen mask, before any retrain).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from launch import run_as_process
from launch.common import blocking_for, evaluate_test_split, fit, shard_run_task, stage_parser, start
from launch.prune import plan_summary
from launch.search import alpha_parameter, search_train_batches
from pipeline.search.alpha_table import alpha_rows
from pipeline.search.nis import EpisodeLog, NISController, NISSearch
from pipeline.search.nis_grid import PROJECTION, BlockGrid, most_probable_within_budget
from pipeline.tasks import RunTask, build_search_task
from plans.blocking import Blocking
from sharding.dmp import all_reduce_mean


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--cr", type=float, help="target compression ratio (sets nis.target_cr)")
    args = parser.parse_args(argv)
    if args.cr is not None:
        args.set.append(f"nis.target_cr={args.cr}")
    return args


def same_on_all_ranks(tensor: torch.Tensor) -> bool:
    """Whether every rank holds exactly this tensor (a rank that differs moves the mean)."""
    local = tensor.detach().double().flatten()
    agree = float(torch.equal(all_reduce_mean(local.clone()), local))
    return all_reduce_mean(torch.tensor([agree])).item() == 1.0


def format_architecture(blocking: Blocking, probs: torch.Tensor, arch: np.ndarray, block_width: int) -> str:
    """Per α row: features, share of occurrences, the controller's probabilities, the choice."""
    lines = ["block  features  share  " + "P(d = 0..S)".ljust(6 * probs.shape[1] - 1) + "  d  width"]
    # alpha_rows labels each row and gives its features and share; its α statistics go unused.
    for row, info in enumerate(alpha_rows(torch.zeros(len(arch), 1), blocking)):
        p = " ".join(f"{v:5.3f}" for v in probs[row].tolist())
        lines.append(
            f"{info['block']:>5}  {info['features']:>8}  {info['mass_share']:.3f}  {p}  "
            f"{arch[row]}  {arch[row] * block_width:>5}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    job = start(args)
    cfg = job.cfg.nis
    # An episode ends with the validation rows the loader adds on DNIS's α steps. Their
    # loss is the reward itself, compared between episodes, not a direction that eq. 8
    # normalises as DNIS's α gradient is: it stays in float32.
    job.cfg = dataclasses.replace(job.cfg, search=dataclasses.replace(
        job.cfg.search, alpha_interval=cfg.steps_per_episode, alpha_grad_dtype="float32",
    ))
    job.run.save_config(job.cfg)
    blocking = blocking_for(job)
    job.run.write_json("blocking.json", blocking.to_json())
    try:
        grid = BlockGrid.build(blocking, job.layout.num_embeddings, job.cfg.model.embedding_dim, cfg.dim_blocks)
        budget = grid.budget(cfg.target_cr)
    except ValueError as error:
        raise SystemExit(f"dnis nis: {error}") from None
    task = build_search_task(job.cfg, job.layout, blocking, torch.device("meta"))
    dmp, optimizer = shard_run_task(job, RunTask(task, blocking=blocking))
    alpha = alpha_parameter(dmp)
    controller = NISController(grid.num_rows, cfg.dim_blocks, cfg.controller_lr, cfg.baseline_decay, job.cfg.run.seed)
    episodes = job.run.path / "nis.jsonl" if job.env.is_main else None
    if episodes is not None and not args.resume:
        episodes.unlink(missing_ok=True)
    search = NISSearch(controller, grid, alpha, cfg, all_reduce_mean, EpisodeLog(episodes))
    train_batches, steps_per_epoch = search_train_batches(job, task)
    scheduled = min(steps_per_epoch, job.cfg.train.max_steps or steps_per_epoch) * job.cfg.train.epochs
    if cfg.warmup_steps >= scheduled:
        raise SystemExit(
            f"dnis nis: nis.warmup_steps {cfg.warmup_steps} leaves no episode in the {scheduled} steps "
            "of the schedule (train.epochs x steps per epoch); lower it"
        )
    fit(job, dmp, optimizer, train_batches, steps_per_epoch, [search], resume=args.resume)
    if search.episodes == 0:
        raise SystemExit("dnis nis: early stopping ended the run inside the warm-up: no episode ran "
                         "(raise train.patience or lower nis.warmup_steps)")

    state = controller.state_dict()
    if not same_on_all_ranks(torch.cat([state["logits"].flatten(), state["generator"].double()])):
        raise SystemExit("dnis nis: the controller differs between ranks (it must see the same rewards)")
    try:
        arch = most_probable_within_budget(grid, controller.log_probs(), budget)
    except ValueError as error:
        raise SystemExit(f"dnis nis: CR {cfg.target_cr:g} is unreachable: {error}") from None
    plan = grid.plan(arch)
    probs = controller.log_probs().exp()
    summary = {
        "probabilities": probs.tolist(), "logits": state["logits"].tolist(), "architecture": arch.tolist(),
        "dim_blocks": cfg.dim_blocks, "block_width": grid.block_width, "episodes": search.episodes,
        "baseline": controller.baseline, "target_cr": cfg.target_cr, "budget_bytes": budget,
        "embedding_bytes": grid.bytes(arch), "unpruned_bytes": grid.unpruned_bytes(),
        "compression_ratio": plan.compression_ratio(PROJECTION), "ranks_agree": True,
    }
    job.run.write_json("nis.json", summary)
    if not any(g.width for g in plan.groups):  # written all the same: it is what the controller chose
        job.log(f"dnis nis: after {search.episodes} episodes the controller's architecture keeps no column "
                f"of any block; retraining it is refused (run more episodes or lower nis.cost_weight)")
    target = {"cr": cfg.target_cr, "tau": None}
    job.run.write_json("prune.json", {
        **plan_summary(plan, PROJECTION, target, 1, job.wall_s), "method": "nis", "architecture": arch.tolist(),
    })
    job.log(
        f"NIS-ME: {search.episodes} episodes; architecture within CR {cfg.target_cr:g} reaches CR "
        f"{summary['compression_ratio']:.2f} ({summary['embedding_bytes']:,} of {summary['unpruned_bytes']:,} "
        f"bytes, learned projections)\n" + format_architecture(blocking, probs, arch, grid.block_width)
    )
    with torch.no_grad():
        alpha.copy_(grid.mask(arch))
    extra = {"architecture": arch.tolist(), "compression_ratio": summary["compression_ratio"]}
    evaluate_test_split(job, dmp, "nis", extra)
    return summary


if __name__ == "__main__":
    run_as_process(main)
