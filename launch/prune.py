"""Prune a finished search: structured (what ships) or fine-grained (paper eq. 9).

Structured keeps columns of every (feature, block, id range) group, for a byte budget
``--cr`` or a threshold ``--tau``; fine-grained zeroes the entries of Ẽ = E ⊙ α below
ε, for ``--cr`` or ``--epsilon``. On a plain train run both use α = 1 over the config's
frequency blocking: magnitude pruning (column RMS, or |E|), the baseline at the same
granularity.

    python -m launch.prune --run-dir runs/synthetic/search --cr 10
    python -m launch.prune --run-dir runs/synthetic/search --mode fine --cr 10
    torchx run -s local_cwd launch/components.py:prune --run_dir runs/synthetic/search --cr 10

Structured: column j of a group is kept when ``α[block, j] × RMS_j(E[group rows])``
clears τ; the RMS comes from the tables' shards on every rank (no table is gathered).
With ``--basis principal`` the columns are those of each feature's rows turned into
their principal directions (``pipeline.prune.basis``; Gram matrices from the shards).
Writes ``prune.json`` (the plan, its compression ratio for both projections, bytes) to
the run directory and prints the kept width per block.

Fine: ε comes from a distributed quantile of |Ẽ| over the shards (``pipeline.prune.fine``);
the pruned α-model is evaluated on the test split and the result (COO bytes, CR, AUC,
logloss) replaces the entry of the same target in ``fine_prune.json``, so a sweep of
``--cr`` values accumulates there.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from launch import run_as_process
from launch.common import Job, blocking_for, load_run
from pipeline.evaluate import evaluate
from pipeline.loop import BEST
from pipeline.prune.fine import FinePrune, apply_epsilon, epsilon_for_cr, table_bytes
from pipeline.prune.basis import BASES, basis_to_json, principal_basis
from pipeline.prune.knapsack import parse_widths, value_plan_for_cr
from pipeline.prune.plan import CR_TOLERANCE, group_mass, group_ranges, plan_for_cr, plan_for_tau
from pipeline.tasks import retrained_plan
from plans.bytes import unpruned_bytes
from plans.structured import StructuredPlan
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.dmp import init_distributed
from sharding.repack import PROJECTIONS
from sharding.table_stats import group_gram, group_sum_sq

MODES = ("structured", "fine")
ALLOCATIONS = ("threshold", "value")
FINE_RESULTS = "fine_prune.json"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="the run directory of a finished search")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--cr", type=float, help="target compression ratio (the bytes never exceed unpruned / cr)")
    target.add_argument("--tau", type=float, help="keep columns whose α × column RMS is at least this (structured)")
    target.add_argument("--epsilon", type=float, help="keep entries whose |E × α| is at least this (fine)")
    parser.add_argument(
        "--mode", choices=MODES, default="structured",
        help="structured: drop columns of groups (what ships); fine: zero single entries (eq. 9, COO bytes)",
    )
    parser.add_argument(
        "--allocation", choices=ALLOCATIONS, default="threshold",
        help="threshold: one τ on α × RMS, widths in steps of 4; value: columns by worth per byte "
             "(occurrences × α × RMS), any width, every group one column first (structured, --cr)",
    )
    parser.add_argument(
        "--width-step", type=int, default=1, choices=(1, 2, 4),
        help="value allocation: widths in steps of this many columns (2: every table quantizes "
             "to int8, 4: to int4; FBGEMM needs width x bits to be a multiple of 16, and serves "
             "other tables in fp32)",
    )
    parser.add_argument(
        "--widths", type=parse_widths, metavar="W1,W2,...",
        help="value allocation: the only widths a group may take (e.g. 1,2,4,8,16,32: fewer distinct "
             "widths per feature, fewer column slabs to look up); default every multiple of --width-step",
    )
    parser.add_argument(
        "--bits", type=int, choices=(8, 4),
        help="value allocation: count the budget in bytes of tables quantized row-wise to this many bits "
             "(as served with --int8 / --bits: about 3x the columns of fp32 at 8 bits on wide rows); "
             "needs --width-step 16/bits or a ladder of such widths",
    )
    parser.add_argument(
        "--min-row-lookups", type=float, default=0,
        help="value allocation: ids of a group seen fewer times than this on average share rows "
             "(hashing), each shared row serving at least this many train occurrences (halved while "
             "the budget has room for more rows); 0: a row per id",
    )
    parser.add_argument(
        "--ranges-per-block", type=int, default=8,
        help="cut each (feature, block) into this many id ranges with their own widths (higher CRs need more)",
    )
    parser.add_argument(
        "--projection", choices=PROJECTIONS,
        help="how the shipped model maps widths back to K: fixed selection, or learned (NIS-ME; its bytes "
             "count); default: selection, learned with --basis principal",
    )
    parser.add_argument(
        "--basis", choices=BASES, default="columns",
        help="columns: keep the tables' own columns; principal: turn each feature's rows into its principal "
             "directions first (count-weighted), so a narrow width keeps the most energy (learned projection)",
    )
    parser.add_argument("--checkpoint", default=BEST, help="checkpoint of the search to prune")
    args = parser.parse_args(argv)
    if args.bits is not None and (args.cr is None or args.allocation != "value" or args.mode != "structured"):
        parser.error("--bits applies to --allocation value with --cr")
    if args.basis == "principal" and (args.mode == "fine" or args.projection == "selection"):
        parser.error("--basis principal needs --mode structured and the learned projection")
    args.projection = args.projection or ("learned" if args.basis == "principal" else "selection")
    if (args.tau is not None and args.mode == "fine") or (args.epsilon is not None and args.mode == "structured"):
        parser.error(f"--{'tau' if args.tau is not None else 'epsilon'} does not apply to --mode {args.mode}")
    return args


def width_table(plan: StructuredPlan) -> str:
    """Rows-weighted mean kept width per α row (block), the ids it covers and the rows
    they are stored in (fewer where ids share rows)."""
    rows: dict[int, list[int]] = {}
    for g in plan.groups:
        total = rows.setdefault(g.group.block, [0, 0, 0])
        total[0] += g.group.rows * g.width
        total[1] += g.group.rows
        total[2] += g.stored_rows if g.width else 0
    lines = ["block  ids        mean width  stored rows"]
    for block, (weighted, count, stored) in sorted(rows.items()):
        lines.append(f"{block:>5}  {count:>9}  {weighted / max(count, 1):>10.2f}  {stored:>11}")
    return "\n".join(lines)


def searched_alpha(dmp, blocking, embedding_dim: int) -> torch.Tensor:
    """α of the search task (on the CPU); all ones for a plain model (magnitude pruning)."""
    alphas = [m.alpha for m in dmp.modules() if isinstance(m, AlphaEmbeddingBagCollection)]
    return alphas[0].detach().cpu() if alphas else torch.ones(blocking.num_alpha_rows, embedding_dim)


def plan_summary(
    plan: StructuredPlan, projection: str, target: dict, ranges_per_block: int, wall_s: float
) -> dict:
    """``prune.json``: the plan, its CR and bytes for both projections, and what asked for it
    (also written by ``launch.nis``, so retraining reads either the same way)."""
    return {
        "target": target, "projection": projection, "ranges_per_block": ranges_per_block, "tau": plan.tau,
        "compression_ratio": {p: plan.compression_ratio(p) for p in PROJECTIONS},
        "embedding_bytes": {p: plan.embedding_bytes(p) for p in PROJECTIONS},
        "unpruned_bytes": plan.unpruned_bytes(), "wall_s": wall_s, "plan": plan.to_json(),
    }


def prune(job: Job, dmp, blocking, args: argparse.Namespace) -> tuple[StructuredPlan, dict]:
    """The structured plan ``args`` ask for, and what ``prune.json`` should add about it
    (with ``--basis principal``: each feature's rotation, ``pipeline.prune.basis``)."""
    alpha = searched_alpha(dmp, blocking, job.cfg.model.embedding_dim)
    groups = group_ranges(blocking, job.layout.num_embeddings, args.ranges_per_block)
    mass = group_mass(groups, job.layout.counts)
    sum_sq, alpha, rotations = column_statistics(dmp, groups, alpha, mass, args.basis)
    plan, notes = plan_for(groups, sum_sq, alpha, mass, args)
    return plan, {**notes, **({"rotations": basis_to_json(rotations)} if rotations else {})}


def column_statistics(model, groups, alpha: torch.Tensor, mass, basis: str):
    """What a plan scores, ``(sum_sq, α, rotations)``: per group the column sums of
    squares of ``model``'s tables and the searched α, or with ``basis`` principal those of
    each feature's principal columns, α folded in (so α = 1), and the rotations."""
    if basis == "principal":
        rotations, sum_sq = principal_basis(groups, group_gram(model, groups, alpha.shape[1]), alpha, mass)
        return sum_sq, torch.ones_like(alpha), rotations
    return group_sum_sq(model, groups, alpha.shape[1]), alpha, None


def plan_for(groups, sum_sq, alpha, mass, args: argparse.Namespace) -> tuple[StructuredPlan, dict]:
    """The plan of ``args``' target from the groups' column statistics."""
    if args.cr is not None and args.allocation == "value":
        budget = unpruned_bytes(sum(g.rows for g in groups), alpha.shape[1]) / args.cr
        plan, lookups = value_plan_for_cr(groups, sum_sq, alpha, mass, budget, args.projection, args.width_step,
                                          args.min_row_lookups, CR_TOLERANCE, args.widths, args.bits)
        return plan, {"min_row_lookups_used": lookups}
    if args.cr is not None:
        return plan_for_cr(groups, sum_sq, alpha, mass, args.cr, args.projection, CR_TOLERANCE), {}
    return plan_for_tau(groups, sum_sq, alpha, mass, args.tau), {}


def main(argv: Optional[Sequence[str]] = None) -> StructuredPlan | dict:
    args = parse_args(argv)
    env = init_distributed()
    if retrained_plan(args.run_dir) is not None:
        raise SystemExit(f"{args.run_dir}: a retrain run is pruned already; prune its search or train run")
    job, dmp, blocking = load_run(env, args.run_dir, args.checkpoint, show_progress=False)
    score = "alpha_rms" if blocking is not None else "magnitude"
    blocking = blocking or blocking_for(job)
    if args.mode == "fine":
        return fine_prune(job, dmp, blocking, args)
    try:
        plan, notes = prune(job, dmp, blocking, args)
    except ValueError as error:  # an unreachable compression ratio, or shards without whole rows
        raise SystemExit(f"dnis prune: {error}") from None
    target = {"cr": args.cr, "tau": args.tau}
    summary = {
        **plan_summary(plan, args.projection, target, args.ranges_per_block, job.wall_s),
        "score": score, "allocation": args.allocation, "min_row_lookups": args.min_row_lookups,
        "widths": args.widths, "bits": args.bits, "basis": args.basis, **notes,
    }
    if args.bits is not None:
        summary["compression_ratio_quantized"] = plan.compression_ratio(args.projection, args.bits)
    job.run.write_json("prune.json", summary)
    job.run.log("prune", **{k: v for k, v in summary.items() if k not in ("plan", "rotations")})
    how = "value per byte" if args.cr is not None and args.allocation == "value" else f"τ {plan.tau:.4g}"
    if notes.get("min_row_lookups_used"):
        how += f", ids of groups seen under {notes['min_row_lookups_used']:g} times on average sharing rows"
    if args.bits is not None:
        how += (f", budget in INT{args.bits} bytes: CR {plan.compression_ratio(args.projection, args.bits):.2f} "
                f"quantized ({plan.embedding_bytes(args.projection, args.bits):,} bytes)")
    job.log(
        f"structured prune: {how}, CR {plan.compression_ratio(args.projection):.2f} "
        f"({args.projection} projection), {plan.embedding_bytes(args.projection):,} of "
        f"{plan.unpruned_bytes():,} embedding bytes\n" + width_table(plan)
    )
    return plan


def fine_threshold(dmp, blocking, alpha: torch.Tensor, args: argparse.Namespace) -> FinePrune:
    """The target's ε, applied to ``dmp``'s tables (in memory only)."""
    if args.cr is not None:
        try:
            epsilon = epsilon_for_cr(dmp, blocking, alpha, args.cr).epsilon
        except ValueError as error:  # an unreachable compression ratio
            raise SystemExit(f"dnis prune: {error}") from None
    else:
        epsilon = args.epsilon
    nnz = apply_epsilon(dmp, blocking, alpha, epsilon)
    if nnz == 0:
        raise SystemExit(f"dnis prune: ε {epsilon:.6g} keeps no entry; ask for a lower CR or ε")
    return FinePrune(epsilon, nnz, table_bytes(dmp, blocking))


def with_result(results: list[dict], entry: dict) -> list[dict]:
    """``results`` with ``entry`` replacing the one of the same target (CR, or ε when
    no CR was asked for), or appended."""
    def target(e: dict) -> tuple:
        return (e["target_cr"], None if e["target_cr"] is not None else e["epsilon"])

    replaced = [entry if target(e) == target(entry) else e for e in results]
    return replaced if any(e is entry for e in replaced) else replaced + [entry]


def fine_prune(job: Job, dmp, blocking, args: argparse.Namespace) -> dict:
    """Fine-grained prune (eq. 9) for ``--cr`` or ``--epsilon``, evaluated on the test
    split; its entry in ``fine_prune.json``."""
    pruned = fine_threshold(dmp, blocking, searched_alpha(dmp, blocking, job.cfg.model.embedding_dim), args)
    test = evaluate(dmp, job.reader("test", train=False).batches(), job.env.device, desc="test")
    entry = {"target_cr": args.cr, **pruned.to_json(), "test": test, "wall_s": job.wall_s}
    if job.env.is_main:
        exists = (job.run.path / FINE_RESULTS).is_file()
        results = job.run.read_json(FINE_RESULTS)["results"] if exists else []
        job.run.write_json(FINE_RESULTS, {"results": with_result(results, entry)})
    job.run.log("prune_fine", **entry)
    target = f"target {args.cr:g}" if args.cr is not None else "ε given"
    job.log(
        f"fine-grained prune: ε {pruned.epsilon:.6g}, CR {pruned.compression_ratio:.3f} ({target}), "
        f"{pruned.nnz:,} entries kept, {pruned.coo_bytes:,} COO of {pruned.unpruned_bytes:,} embedding "
        f"bytes; test auc {test['auc']:.5f} logloss {test['logloss']:.5f} rows {test['rows']}; {entry['wall_s']} s"
    )
    return entry


if __name__ == "__main__":
    run_as_process(main)
