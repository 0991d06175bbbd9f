"""Plan a config's or run's models for a target cluster (TorchRec's planner, on this CPU).

    dnis plan --config configs/criteo_1tb.yaml --world-size 8 --hbm-gb 80
    dnis plan --run-dir runs/synthetic/search/retrain --world-size 64 --hbm-gb 80 --min-world-size

Models: ``unpruned`` (the plain train task), ``search`` (the α-EBC search task, planned
for its train plus ``search.val_batch_size`` validation rows per step) and ``repacked``
(the mixed-width tables of a run's ``prune.json``). Table sizes come from the dataset's
metadata at ``data.path`` or, when the data is absent, from ``data.table_sizes``.

Per table it prints the sharding type, compute kernel and ranks; per rank the planner's
HBM/DDR storage estimates and the weight and optimizer bytes of the shards placed
there (see ``sharding.target_plan``); ``--min-world-size`` adds the smallest power-of-two
world size of such devices that the planner finds a plan for.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torchrec.distributed.planner.types import PlannerError

from launch import run_as_process
from launch.common import add_run_options
from pipeline.config import Config, ConfigError, load_config
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import METADATA_FILE, DatasetMeta
from pipeline.search.blocking import compute_blocking
from pipeline.tasks import build_retrain_task, build_search_task, build_train_task
from plans.blocking import Blocking
from plans.structured import StructuredPlan
from sharding.dmp import fuse_table_optimizer
from sharding.repack import repacked_constraints
from sharding.target_plan import COMPUTE_DEVICES, GIB, TargetCluster, TargetPlan, plan_for_cluster, smallest_world_size

MODELS = ("unpruned", "search", "repacked")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", action="append", help="YAML config (repeatable; later files override)")
    source.add_argument("--run-dir", help="a run directory (its config.yaml; its prune.json for 'repacked')")
    parser.add_argument("--world-size", type=int, required=True, help="ranks of the target job")
    parser.add_argument("--local-world-size", type=int, default=8, help="ranks per host (default 8)")
    parser.add_argument("--hbm-gb", type=float, help="HBM per device in GiB (default: TorchRec's)")
    parser.add_argument("--ddr-gb", type=float, help="host memory per device in GiB (default: TorchRec's)")
    parser.add_argument("--compute-device", choices=COMPUTE_DEVICES, default="cuda")
    parser.add_argument("--batch-size", type=int, help="train rows per rank per step (default: data.batch_size)")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS,
        help="which models to plan (default: unpruned and search, and repacked when the run has prune.json)",
    )
    parser.add_argument("--min-world-size", action="store_true", help="also find the smallest world size that fits")
    parser.add_argument("--max-world-size", type=int, default=4096, help="largest world size --min-world-size tries")
    parser.add_argument("--json", help="write the plans to this JSON file")
    add_run_options(parser, resume=False)
    return parser.parse_args(argv)


@dataclass
class PlannedModel:
    """One model to plan: its task on ``meta``, planner constraints and rows per rank."""

    name: str
    task: nn.Module
    batch_size: int
    constraints: Optional[dict] = None


def layout_for(cfg: Config, source: str) -> FeatureLayout:
    """The dataset's layout from its metadata, else from ``data.table_sizes``."""
    data = cfg.data
    if (Path(data.path) / METADATA_FILE).is_file():
        return FeatureLayout.from_config(DatasetMeta.load(data.path), data)
    if not data.table_sizes:
        raise SystemExit(
            f"{source}: data.path {data.path} has no {METADATA_FILE} and data.table_sizes is empty; "
            "preprocess the data or list the table sizes"
        )
    try:
        return FeatureLayout.from_table_sizes(data.table_sizes, data.dense_mode)
    except ValueError as error:
        raise SystemExit(f"{source}: {error}") from None


def models_to_plan(
    cfg: Config, layout: FeatureLayout, run_dir: Optional[Path], batch_size: int, names: Optional[Sequence[str]]
) -> list[PlannedModel]:
    """The requested models of ``cfg`` (and of ``run_dir``), tables on ``meta``."""
    meta = torch.device("meta")
    prune_file = run_dir / "prune.json" if run_dir else None
    has_prune = prune_file is not None and prune_file.is_file()
    names = list(names or (["unpruned", "search"] + (["repacked"] if has_prune else [])))
    if "repacked" in names and not has_prune:
        raise SystemExit(f"{run_dir or '--config'}: 'repacked' needs --run-dir of a run with prune.json")
    out = []
    for name in names:
        if name == "unpruned":
            out.append(PlannedModel(name, build_train_task(cfg, layout, meta), batch_size))
        elif name == "search":
            task = build_search_task(cfg, layout, _blocking(cfg, layout, run_dir), meta)
            # One KJT carries the train rows and the α step's validation rows.
            out.append(PlannedModel(name, task, batch_size + cfg.search.val_batch_size))
        else:
            pruned = json.loads(prune_file.read_text())
            task = build_retrain_task(cfg, layout, StructuredPlan.from_json(pruned["plan"]), pruned["projection"], meta)
            out.append(PlannedModel(name, task, batch_size, repacked_constraints(task.model.embedding)))
    return out


def _blocking(cfg: Config, layout: FeatureLayout, run_dir: Optional[Path]) -> Blocking:
    """A search run's own blocking, else one from the layout's counts (the shapes, all the
    planner sees, are the same for any cuts)."""
    saved = run_dir / "blocking.json" if run_dir else None
    if saved is not None and saved.is_file():
        return Blocking.from_json(json.loads(saved.read_text()))
    b = cfg.blocking
    return compute_blocking(layout.counts, b.num_blocks, b.mode, b.per_field)


def format_plan(name: str, plan: TargetPlan, smallest: Optional[int] = None) -> str:
    """The printed report of one planned model (and the smallest world size, if searched)."""
    c = plan.cluster
    lines = [
        f"{name}: {len(plan.tables)} tables, batch {plan.batch_size} per rank, {c.world_size} x {c.compute_device} "
        f"(hbm {plan.capacity_hbm / GIB:.1f} GiB, ddr {plan.capacity_ddr / GIB:.1f} GiB per device), "
        f"{min(c.local_world_size, c.world_size)} per host",
        f"  {'table':<16} {'sharding':<18} {'kernel':<20} ranks",
    ]
    lines += [
        f"  {t.table:<16} {t.sharding_type:<18} {t.compute_kernel:<20} {rank_ranges(t.ranks)}" for t in plan.tables
    ]
    lines.append(f"  {'rank':<6} {'planner hbm GiB':>16} {'planner ddr GiB':>16} {'weights GiB':>12} {'optimizer GiB':>14}")
    rows = [(str(r.rank), r.planner_hbm, r.planner_ddr, r.weights, r.optimizer) for r in plan.ranks]
    totals = plan.totals()
    rows.append(("total", totals["planner_hbm"], totals["planner_ddr"], totals["weights"], totals["optimizer"]))
    lines += [
        f"  {rank:<6} {hbm / GIB:>16.3f} {ddr / GIB:>16.3f} {weights / GIB:>12.3f} {opt / GIB:>14.3f}"
        for rank, hbm, ddr, weights, opt in rows
    ]
    lines.append(
        f"  tables: {plan.table_bytes / GIB:.3f} GiB once (+ {plan.replicated_bytes / GIB:.3f} GiB data-parallel per extra rank)"
    )
    if smallest is not None:
        lines.append(f"  smallest world size that fits: {smallest}")
    return "\n".join(lines)


def rank_ranges(ranks: Sequence[int]) -> str:
    """``0-7,16`` for ranks 0..7 and 16."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    # Every try of --min-world-size would repeat TorchRec's dry-run warnings (directly
    # built Topology, meta-device dense estimates); the plan itself is printed below.
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    run_dir = Path(args.run_dir) if args.run_dir else None
    paths = [run_dir / "config.yaml"] if run_dir else args.config
    source = str(run_dir or ", ".join(args.config))
    try:
        cfg = load_config(paths, args.set)
        cluster = TargetCluster(args.world_size, args.local_world_size, args.hbm_gb, args.ddr_gb, args.compute_device)
    except (ConfigError, ValueError) as error:
        raise SystemExit(str(error)) from None
    layout = layout_for(cfg, source)
    batch_size = args.batch_size or cfg.data.batch_size
    optimizer = cfg.train.sparse_optimizer
    report = {"source": source, "models": {}}
    for model in models_to_plan(cfg, layout, run_dir, batch_size, args.models):
        fuse_table_optimizer(model.task, optimizer, cfg.train.sparse_lr)
        plan, smallest = None, None
        try:
            plan = plan_for_cluster(model.task, cluster, model.batch_size, optimizer, model.constraints)
        except PlannerError as error:
            reason = str(error).splitlines()[0]
        if args.min_world_size:
            smallest = smallest_world_size(
                model.task, cluster, model.batch_size, optimizer, model.constraints, args.max_world_size
            )
            if smallest is None:
                device = cluster.topology().devices[0].storage
                raise SystemExit(
                    f"{model.name}: no plan on any world size up to {args.max_world_size} of {cluster.compute_device} "
                    f"devices with {device.hbm / GIB:.2f} GiB HBM and {device.ddr / GIB:.2f} GiB DDR each"
                )
        if plan is None:
            hint = f"the smallest that fits is {smallest}" if smallest else "try --min-world-size or a bigger --hbm-gb"
            raise SystemExit(f"{model.name}: no plan on {cluster.world_size} x {cluster.compute_device} ({reason}); {hint}")
        print(format_plan(model.name, plan, smallest), flush=True)
        report["models"][model.name] = {**plan.to_json(), "smallest_world_size": smallest}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    run_as_process(main)
