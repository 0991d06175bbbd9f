"""Structured prune of a finished search: the kept columns of every (feature, block,
id range) group, for a byte budget (``--cr``) or a threshold (``--tau``).

    python -m launch.prune --run-dir runs/synthetic/search --cr 10
    torchx run -s local_cwd launch/components.py:prune --run_dir runs/synthetic/search --cr 10

Column j of a group is kept when ``α[block, j] × RMS_j(E[group rows])`` clears τ; the
RMS comes from the tables' shards on every rank (no table is gathered). Writes
``prune.json`` (the plan, its compression ratio for both projections, bytes) to the
run directory and prints the kept width per block.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from launch.common import Job, load_run
from pipeline.loop import BEST
from pipeline.prune.plan import StructuredPlan, group_ranges, plan_for_cr, plan_for_tau
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.dmp import init_distributed
from sharding.repack import PROJECTIONS
from sharding.table_stats import group_sum_sq


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="the run directory of a finished search")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--cr", type=float, help="target compression ratio (the bytes never exceed unpruned / cr)")
    target.add_argument("--tau", type=float, help="keep columns whose α × column RMS is at least this")
    parser.add_argument(
        "--ranges-per-block", type=int, default=8,
        help="cut each (feature, block) into this many id ranges with their own widths (higher CRs need more)",
    )
    parser.add_argument(
        "--projection", choices=PROJECTIONS, default="selection",
        help="how the shipped model maps widths back to K: fixed selection, or learned (NIS-ME; its bytes count)",
    )
    parser.add_argument("--checkpoint", default=BEST, help="checkpoint of the search to prune")
    return parser.parse_args(argv)


def width_table(plan: StructuredPlan) -> str:
    """Rows-weighted mean kept width per α row (block), and the rows it covers."""
    rows: dict[int, list[int]] = {}
    for g in plan.groups:
        total = rows.setdefault(g.group.block, [0, 0])
        total[0] += g.group.rows * g.width
        total[1] += g.group.rows
    lines = ["block  ids        mean width"]
    for block, (weighted, count) in sorted(rows.items()):
        lines.append(f"{block:>5}  {count:>9}  {weighted / max(count, 1):>10.2f}")
    return "\n".join(lines)


def prune(job: Job, dmp, blocking, args: argparse.Namespace) -> StructuredPlan:
    alpha = next(m for m in dmp.modules() if isinstance(m, AlphaEmbeddingBagCollection)).alpha
    alpha = alpha.detach().cpu()
    groups = group_ranges(blocking, job.layout.num_embeddings, args.ranges_per_block)
    sum_sq = group_sum_sq(dmp, groups, job.cfg.model.embedding_dim)
    if args.cr is not None:
        return plan_for_cr(groups, sum_sq, alpha, args.cr, args.projection)
    return plan_for_tau(groups, sum_sq, alpha, args.tau)


def main(argv: Optional[Sequence[str]] = None) -> StructuredPlan:
    args = parse_args(argv)
    env = init_distributed()
    job, dmp, blocking = load_run(env, args.run_dir, args.checkpoint, show_progress=False)
    if blocking is None:
        raise SystemExit(f"{args.run_dir}: not a search run (no blocking.json); prune needs α")
    try:
        plan = prune(job, dmp, blocking, args)
    except ValueError as error:  # an unreachable compression ratio
        raise SystemExit(f"dnis prune: {error}") from None
    summary = {
        "target": {"cr": args.cr, "tau": args.tau}, "projection": args.projection,
        "ranges_per_block": args.ranges_per_block, "tau": plan.tau,
        "compression_ratio": {p: plan.compression_ratio(p) for p in PROJECTIONS},
        "embedding_bytes": {p: plan.embedding_bytes(p) for p in PROJECTIONS},
        "unpruned_bytes": plan.unpruned_bytes(), "wall_s": job.wall_s, "plan": plan.to_json(),
    }
    job.run.write_json("prune.json", summary)
    job.run.log("prune", **{k: v for k, v in summary.items() if k != "plan"})
    job.log(
        f"structured prune: τ {plan.tau:.4g}, CR {plan.compression_ratio(args.projection):.2f} "
        f"({args.projection} projection), {plan.embedding_bytes(args.projection):,} of "
        f"{plan.unpruned_bytes():,} embedding bytes\n" + width_table(plan)
    )
    return plan


if __name__ == "__main__":
    main()
