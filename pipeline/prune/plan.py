"""Structured pruning: choosing which columns of each (feature, block, id range) group ship.

A group is an id range of one feature inside one frequency block (ids are frequency
ranks, so a block's ids of a feature are one range). Column ``j`` of group ``g`` scores
``α[g.block, j] × RMS_j(g)`` (the column's root mean square over the group's rows): the
scale of what the α-model feeds forward through that column. A group's width is the
number of its columns scoring ≥ τ, rounded up to a multiple of 4 (FBGEMM tables need
it); a group with none has width 0: it is dropped and its ids embed to zeros. Which
columns a group of width ``w`` keeps is nested (``nested.py``): the first ``w`` of one
column order per feature, chosen by the scores of the groups that store each position,
so that the repacked layout shares column slabs between a feature's groups. Every
stored column is a kept column.

τ is chosen for a byte budget (``plan_for_cr``). The plan types (``Group``, ``GroupPlan``,
``StructuredPlan``) live in ``plans.structured``, byte accounting in ``plans.bytes``.

Example:
    >>> g = [Group("a", 0, 0, 2), Group("a", 1, 2, 100)]
    >>> sum_sq = torch.tensor([[8.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ...                        [10.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    >>> alpha = torch.ones(2, 8)
    >>> p = plan_for_tau(g, sum_sq, alpha, [100, 98], tau=1.0)  # scores: [2, 1, 0...] and [0.32, 0.1, 0...]
    >>> [(gp.columns, gp.width) for gp in p.groups]
    [((0, 1, 2, 3), 4), ((), 0)]
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pipeline.prune.nested import nested_columns
from plans.blocking import Blocking
from plans.bytes import plan_bytes, unpruned_bytes
from plans.structured import WIDTH_MULTIPLE, Group, GroupPlan, StructuredPlan

# A structured prune for a target CR lands at most this far above it, or is refused.
CR_TOLERANCE = 0.10


def group_ranges(
    blocking: Blocking, num_embeddings: dict[str, int], ranges_per_block: int = 1
) -> list[Group]:
    """Every feature's blocks, each cut into up to ``ranges_per_block`` id ranges.

    Range edges are geometric in the id (``start · (stop/start)^(r/R)``, ``start`` taken
    as 1 for the first block), so frequent ids (small ranks) get narrower ranges. A block
    of ``n`` ids gets ``min(n, R)`` non-empty ranges; empty blocks give no group. Groups
    come in ``blocking.keys`` order, then by id.

    Example:
        >>> from pipeline.search.blocking import compute_blocking
        >>> b = compute_blocking({"a": [[5, 10], [1, 90]]}, num_blocks=2, mode="equal_mass")
        >>> [(g.block, g.start, g.stop) for g in group_ranges(b, {"a": 100}, 2)]
        [(0, 0, 5), (0, 5, 30), (1, 30, 55), (1, 55, 100)]
    """
    if ranges_per_block < 1:
        raise ValueError(f"ranges_per_block must be >= 1, got {ranges_per_block}")
    groups = []
    for key in blocking.keys:
        edges = [0, *blocking.cuts[key], num_embeddings[key]]
        for local, (start, stop) in enumerate(zip(edges[:-1], edges[1:])):
            for lo, hi in _range_edges(start, stop, ranges_per_block):
                groups.append(Group(key, blocking.row_offset(key) + local, lo, hi))
    return groups


def _range_edges(start: int, stop: int, ranges: int) -> list[tuple[int, int]]:
    """``min(stop - start, ranges)`` non-empty geometric ranges covering ``[start, stop)``."""
    n = min(stop - start, ranges)
    if n <= 0:
        return []
    base = max(start, 1)
    edges = [start]
    for r in range(1, n):
        edge = int(round(base * (stop / base) ** (r / n)))
        edges.append(min(max(edge, edges[-1] + 1), stop - (n - r)))
    edges.append(stop)
    return list(zip(edges[:-1], edges[1:]))


def group_mass(groups: list[Group], counts: dict[str, list[list[int]]]) -> np.ndarray:
    """Train occurrences of each group's ids, from run-length encoded counts per key."""
    edges, totals = {}, {}
    for key, runs in counts.items():
        runs_arr = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        edges[key] = np.r_[0, np.cumsum(runs_arr[:, 1])]
        totals[key] = np.r_[0, np.cumsum(runs_arr[:, 0] * runs_arr[:, 1])]

    def mass_before(key: str, stop: int) -> int:
        e, t = edges[key], totals[key]
        run = min(int(np.searchsorted(e, stop, side="right")) - 1, len(e) - 2)
        per_id = (t[run + 1] - t[run]) // max(e[run + 1] - e[run], 1)
        return int(t[run] + per_id * (min(stop, e[-1]) - e[run]))

    return np.array([mass_before(g.key, g.stop) - mass_before(g.key, g.start) for g in groups])


def column_scores(groups: list[Group], sum_sq, alpha) -> np.ndarray:
    """``[G, K]`` scores: ``α[g.block, j] · sqrt(sum_sq[g, j] / rows_g)``."""
    sum_sq = torch.as_tensor(sum_sq, dtype=torch.float64).cpu().numpy()
    alpha = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu().numpy()
    if sum_sq.shape != (len(groups), alpha.shape[1]):
        raise ValueError(f"sum_sq is {sum_sq.shape}, expected ({len(groups)}, {alpha.shape[1]})")
    rows = np.array([g.rows for g in groups], dtype=np.float64)
    blocks = np.array([g.block for g in groups], dtype=np.int64)
    return alpha[blocks] * np.sqrt(sum_sq / rows[:, None])


def plan_for_tau(groups: list[Group], sum_sq, alpha, mass, tau: float) -> StructuredPlan:
    """The plan whose widths hold every column that scores ≥ ``tau``, nested by the
    scores weighted with ``mass`` (train occurrences per group, ``group_mass``)."""
    return _plan(groups, column_scores(groups, sum_sq, alpha), mass, tau)


def plan_for_cr(
    groups: list[Group], sum_sq, alpha, mass, target_cr: float, projection: str = "selection",
    tolerance: Optional[float] = None,
) -> StructuredPlan:
    """The plan with the smallest τ whose bytes fit ``unpruned / target_cr`` (nested as
    ``plan_for_tau``).

    Bytes never increase with τ, so a bisection over the distinct scores finds it; the
    result is the largest threshold plan within the budget (widths move in steps of 4
    columns of a group, so it usually lands just below the budget; one τ step can drop
    a large group at once, and then far below it).

    Raises:
        ValueError: when even the plan at the highest score (one group, width 4) is over
            the budget (the message gives the highest CR reachable), or, with
            ``tolerance``, when the plan's CR is above ``target_cr * (1 + tolerance)``
            (the message gives the threshold plans' CRs on either side of the target).
    """
    if target_cr <= 0:
        raise ValueError(f"target CR must be > 0, got {target_cr}")
    scores = column_scores(groups, sum_sq, alpha)
    dim = scores.shape[1]
    rows = np.array([g.rows for g in groups], dtype=np.int64)
    budget = unpruned_bytes(rows.sum(), dim) / target_cr
    taus = np.unique(scores)

    keys = [g.key for g in groups]

    def fits(i: int) -> bool:
        return plan_bytes(keys, rows, _widths(scores, taus[i]), dim, projection) <= budget

    if not fits(len(taus) - 1):
        smallest = plan_bytes(keys, rows, _widths(scores, taus[-1]), dim, projection)
        raise ValueError(
            f"compression ratio {target_cr:g} is unreachable with {len(groups)} groups and "
            f"the {projection!r} projection: the smallest non-empty plan reaches CR "
            f"{unpruned_bytes(rows.sum(), dim) / smallest:.4g} (more ranges_per_block gives "
            f"smaller groups and higher reachable CRs)"
        )
    lo, hi = 0, len(taus) - 1  # invariant: fits(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    plan = _plan(groups, scores, mass, float(taus[lo]))
    landed = plan.compression_ratio(projection)
    if tolerance is not None and landed > target_cr * (1 + tolerance):
        below = (f"CR {_plan(groups, scores, mass, float(taus[lo - 1])).compression_ratio(projection):.4g} "
                 f"(over the budget) and " if lo > 0 else "")
        raise ValueError(
            f"compression ratio {target_cr:g} is not reachable within {tolerance:.0%} by a threshold: "
            f"the nearest threshold plans reach {below}CR {landed:.4g}; ask for one of them, or use "
            f"the value allocation (widths of any number of columns)"
        )
    return plan


def _widths(scores: np.ndarray, tau: float) -> np.ndarray:
    kept = (scores >= tau).sum(axis=1)
    return -(-kept // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _plan(groups: list[Group], scores: np.ndarray, mass, tau: float) -> StructuredPlan:
    dim = scores.shape[1]
    if dim % WIDTH_MULTIPLE:
        raise ValueError(f"embedding_dim {dim} is not a multiple of {WIDTH_MULTIPLE}")
    kept = nested_columns(groups, _widths(scores, tau), scores, mass)
    return StructuredPlan(tuple(GroupPlan(g, columns) for g, columns in zip(groups, kept)), dim, float(tau))
