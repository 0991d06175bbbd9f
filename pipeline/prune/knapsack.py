"""Structured prune by value per byte: every group's width from one budget (a knapsack).

The τ rule (``plan.plan_for_cr``) keeps a column when ``α × RMS`` clears one global
threshold, whatever the column costs and however often its ids are looked up, in steps
of 4 columns; on data where every id carries signal it can only reach a high CR by
dropping whole groups of ids to zero (DESIGN.md, "Prune, repack, compression ratio").

Here a column is worth ``mass_g × score_gj``, where ``mass_g`` is the train occurrences
of the group's ids (how many lookups the column serves) and ``score_gj = α × RMS`` as
before, and costs ``rows_g × 4`` bytes. The projection back to ``K`` is stored once per
feature, as wide as its widest group (a selection's index byte per column, a learned
``W × K × 4`` bytes), so a step that widens its feature's widest group also pays the
projection columns it adds, and once one group has, the others' steps to that width are
priced again without them. A constant field's single row is cheap to widen, but each of
its columns costs a learned projection row (``K × 4`` bytes): priced without it, the 37
constant fields of a rating log (``dnis-synth --world ratings``) widened, their
projections went over the budget, and the retry with less left 35% of it unspent (CR 15
for 10). The allocation is greedy on worth per byte, each group's columns best first, so
a group's marginal value only falls as it widens and the greedy prefix is the
fractional knapsack optimum (up to the projections' sharing):

1. first every group whose best column scores above zero gets one column (dropping an
   id to width 0 loses everything it learned), if the budget pays for that floor;
2. then the remaining columns by worth per byte until the budget is spent.

Widths are any number of columns (``multiple=1``: narrow tables are data-parallel, see
``sharding.dmp``), so the bytes land within one column of one group of the budget. The
allocation fixes each group's width; which columns fill it is nested per feature
(``nested.nested_columns``, occurrence-weighted like the worth), as the repacked layout needs.

With ``widths`` (a ladder such as 1, 2, 4, 8, 16, 32), a group's width is one of them:
each step of the knapsack then adds the columns up to the next rung, still best first,
so the greedy prefix stays optimal among such plans. Fewer distinct widths per feature
mean fewer column slabs (``sharding.column_slabs``): fewer lookups per id and fewer keys
for the repacked model to serve and retrain.

With ``bits`` (8 or 4) the budget is in quantized bytes, dims × precision in one
budget: a step of ``n`` columns costs ``rows × (ceil(n × bits / 8) + 4)`` (the packed
values and a row's fp16 scale and bias in the slab the step may open; an upper bound,
as consecutive steps often share a slab). A wide row buys about three times the fp32
columns at 8 bits, a narrow one little (4 bytes of scale and bias are one fp32 column),
so fewer, wider steps (a ladder) suit it. Every step must quantize (its columns × bits a
multiple of 16).

With ``min_row_lookups`` = c, a group whose ids average fewer than c train occurrences
shares ``ceil(mass_g / c)`` rows between its ids (``GroupPlan.buckets``: the hashing
trick): rows seen once or twice only memorise their labels, and a shared row is cheaper,
so the allocation widens such groups for the same bytes (``shared_rows``).

Example:
    >>> import torch
    >>> g = [Group("a", 0, 0, 2), Group("a", 1, 2, 100)]
    >>> sum_sq = torch.tensor([[8.0, 2.0, 0.0, 0.0], [49.0, 9.8, 0.0, 0.0]])
    >>> p = plan_by_value(g, sum_sq, torch.ones(2, 4), mass=[200, 98], budget=500)
    >>> [(gp.columns, gp.width) for gp in p.groups], p.embedding_bytes("selection")
    ([((0, 1), 2), ((0,), 1)], 426)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from pipeline.prune.nested import nested_columns
from pipeline.prune.plan import column_scores
from plans.bytes import (
    BUCKETS_BYTES, QUANTIZED_BITS, QUANTIZED_WIDTH_BITS, RANGE_START_BYTES, SCALE_BIAS_BYTES, VALUE_BYTES,
    projection_column_bytes, quantizes,
)
from plans.structured import Group, GroupPlan, StructuredPlan


def shared_rows(groups: list[Group], mass, min_row_lookups: float) -> list[int | None]:
    """Per group, the rows its ids share so that each row serves at least
    ``min_row_lookups`` train occurrences (``None``: the group's ids keep a row each).

    Example:
        >>> shared_rows([Group("a", 0, 0, 10), Group("a", 1, 10, 1000)], [500, 1500], 4)
        [None, 375]
    """
    out = []
    for g, m in zip(groups, mass):
        rows = max(1, -(-int(m) // int(min_row_lookups))) if min_row_lookups > 0 else g.rows
        out.append(rows if rows < g.rows else None)
    return out


def plan_by_value(
    groups: list[Group], sum_sq, alpha, mass, budget: float, projection: str = "selection",
    multiple: int = 1, min_row_lookups: float = 0, widths: Optional[Sequence[int]] = None,
    bits: Optional[int] = None,
) -> StructuredPlan:
    """The plan of most total worth within ``budget`` bytes (see the module docstring),
    widths in steps of ``multiple`` columns (2 lets FBGEMM quantize every table to int8,
    4 to int4) or from the ladder ``widths`` (each a multiple of ``multiple``), ids of
    rarely seen groups sharing rows with ``min_row_lookups`` > 0, bytes counted quantized
    to ``bits`` (``None``: fp32).

    Raises:
        ValueError: for a ladder that is not ascending multiples of ``multiple`` up to
            ``K``, widths that do not quantize to ``bits``, or when the budget does not
            pay for the groups' range starts and the first rung of the cheapest group.
    """
    scores = column_scores(groups, sum_sq, alpha)
    num, dim = scores.shape
    if dim % multiple:
        raise ValueError(f"embedding_dim {dim} is not a multiple of the width step {multiple}")
    ladder = np.array(width_ladder(widths, multiple, dim))
    if bits is not None and (bits not in QUANTIZED_BITS or not quantizes(np.diff(ladder, prepend=0), bits).all()):
        raise ValueError(f"bits {bits}: need 8 or 4, and widths in steps of {QUANTIZED_WIDTH_BITS // max(bits, 1)} "
                         f"(FBGEMM quantizes a slab when its width × bits is a multiple of {QUANTIZED_WIDTH_BITS})")
    buckets = shared_rows(groups, mass, min_row_lookups)
    rows = np.array([g.rows if b is None else b for g, b in zip(groups, buckets)], dtype=np.int64)
    step_columns = np.diff(ladder, prepend=0)[None, :]
    step_cost = rows[:, None] * (
        VALUE_BYTES * step_columns if bits is None else -(-step_columns * bits // 8) + SCALE_BIAS_BYTES
    )  # [groups, rungs]: values only; greedy_rungs adds the projections
    keys = {key: i for i, key in enumerate(dict.fromkeys(g.key for g in groups))}
    projections = Projections(np.array([keys[g.key] for g in groups]), np.concatenate([[0], ladder]),
                              projection_column_bytes(projection, dim))
    order = np.argsort(-scores, axis=1, kind="stable")
    # Worth of each group's steps, best columns first: per column it never rises from one step to the
    # next (per byte it may, with quantized rows: greedy_rungs).
    best_first = np.concatenate([np.zeros((num, 1)), np.cumsum(np.take_along_axis(scores, order, axis=1), axis=1)], 1)
    steps = np.diff(best_first[:, np.concatenate([[0], ladder])], axis=1)
    gains = np.asarray(mass, dtype=np.float64)[:, None] * steps
    left = budget - RANGE_START_BYTES * num - BUCKETS_BYTES * sum(b is not None for b in buckets)
    if left < step_cost[:, 0].min() + projections.column_bytes * ladder[0]:
        raise ValueError(f"a budget of {budget:,.0f} bytes does not pay for one column of any group")
    slack = 0.0  # quantized slabs' cache-line padding: spend that much less and retry
    while True:
        taken = greedy_rungs(gains, step_cost, steps[:, 0] > 0, left - slack, projections)
        kept = nested_columns(groups, np.concatenate([[0], ladder])[taken], scores, mass)
        plans = tuple(GroupPlan(g, columns, multiple, b if columns else None)
                      for g, columns, b in zip(groups, kept, buckets))
        plan = StructuredPlan(plans, dim, tau=0.0)
        over = plan.embedding_bytes(projection, bits) - budget
        if over <= 0:
            return plan
        slack += over


@dataclass(frozen=True)
class Projections:
    """What the features' projections cost: ``feature[g]`` of each group, ``width[r]`` of
    each rung (``width[0] = 0``) and ``column_bytes`` per column of a feature's widest
    group (``plans.bytes.projection_column_bytes``)."""

    feature: np.ndarray
    width: np.ndarray
    column_bytes: int

    def cost(self, widest: int, rung: int, after: int) -> int:
        """Projection bytes of taking rungs ``rung`` to ``after`` in a feature ``widest`` wide."""
        return self.column_bytes * (max(widest, int(self.width[after])) - max(widest, int(self.width[rung])))


def greedy_rungs(
    gains: np.ndarray, step_cost: np.ndarray, floor: np.ndarray, left: float, projections: Projections
) -> np.ndarray:
    """Rungs taken per group within ``left`` bytes: first one rung for every ``floor``
    group (if ``left`` pays for all of them and their features' projections), then steps
    by worth per byte, a step's bytes being its values and the projection columns it adds
    to its feature (none once another group of the feature is as wide): when a group
    widens its feature, the other groups' steps are priced again.

    A group's worth per byte falls from step to step when every column costs the same
    (fp32); with quantized rows a wider step spreads a row's scale and bias over more
    columns and can be worth more per byte than the step before it, which a greedy pass
    would then skip for good. So each group's consecutive steps merge while the later is
    worth more per byte (the upper concave hull), and the greedy takes merged steps whole;
    for fp32 nothing merges.

    >>> free = Projections(np.array([0]), np.array([0, 1, 2]), 0)
    >>> greedy_rungs(np.array([[6.0, 12.0]]), np.array([[6.0, 6.0]]), np.array([False]), 12.0, free)
    array([2])
    """
    num, rungs = gains.shape
    taken = np.zeros(num, dtype=np.int64)
    widest = np.zeros(int(projections.feature.max()) + 1, dtype=np.int64)
    floor_features = np.unique(projections.feature[floor])
    floor_cost = step_cost[floor, 0].sum() + projections.column_bytes * projections.width[1] * floor_features.size
    if floor_cost <= left:
        taken[floor] = 1
        widest[floor_features] = projections.width[1]
        left -= floor_cost

    def next_step(g: int) -> Optional[tuple[float, float, int]]:
        """``(gain, bytes, rung after)`` of group ``g``'s next (merged) step, or None."""
        wide = int(widest[projections.feature[g]])
        hull: list[list[float]] = []  # [gain, bytes, rung after]
        for k in range(taken[g], rungs):
            if gains[g, k] <= 0:
                break
            step = [gains[g, k], step_cost[g, k] + projections.cost(wide, k, k + 1), k + 1]
            while hull and step[0] * hull[-1][1] > hull[-1][0] * step[1]:
                gain, cost, _ = hull.pop()
                step = [gain + step[0], cost + step[1], step[2]]
            hull.append(step)
        return tuple(hull[0]) if hull else None

    heap: list[tuple[float, int, int]] = []  # (-worth per byte, group, version)
    version = np.zeros(num, dtype=np.int64)
    steps: dict[int, tuple[float, float, int]] = {}

    def price(g: int) -> None:
        version[g] += 1
        step = next_step(g)
        if step is not None:
            steps[g] = step
            heapq.heappush(heap, (-step[0] / step[1], g, int(version[g])))

    for g in range(num):
        price(g)
    members = {f: np.flatnonzero(projections.feature == f) for f in np.unique(projections.feature)}
    while heap:
        _, g, seen = heapq.heappop(heap)
        if seen != version[g]:
            continue  # priced again since
        gain, cost, after = steps[g]
        if cost > left:
            continue  # this group stops here unless its feature widens
        taken[g], left = after, left - cost
        f = projections.feature[g]
        if projections.width[after] > widest[f]:
            widest[f] = projections.width[after]
            for other in members[f]:
                price(int(other))
        else:
            price(g)
    return taken


def doubling_widths(dim: int) -> list[int]:
    """1, 2, 4, ... up to ``dim`` (and ``dim`` itself): the ladder of ``dnis compare``'s
    ``dnis_ladder``, at most ``log2(dim) + 1`` widths, so slabs, per feature.

    Example:
        >>> doubling_widths(32), doubling_widths(24)
        ([1, 2, 4, 8, 16, 32], [1, 2, 4, 8, 16, 24])
    """
    return sorted({2**i for i in range(dim.bit_length()) if 2**i < dim} | {dim})


def parse_widths(text: str) -> list[int]:
    """``--widths 1,2,4`` as ``dnis prune`` and the benchmarks take it (checked by ``width_ladder``)."""
    return [int(w) for w in text.split(",")]


def width_ladder(widths: Optional[Sequence[int]], multiple: int, dim: int) -> list[int]:
    """The widths a group may take: ``widths``, or every multiple of ``multiple`` up to ``dim``.

    Example:
        >>> width_ladder(None, 8, 32), width_ladder([2, 4, 8], 2, 32)
        ([8, 16, 24, 32], [2, 4, 8])
    """
    if widths is None:
        return list(range(multiple, dim + 1, multiple))
    ladder = [int(w) for w in widths]
    if not ladder or ladder != sorted(set(ladder)) or ladder[0] < 1 or ladder[-1] > dim or any(w % multiple for w in ladder):
        raise ValueError(f"widths {ladder}: need ascending distinct multiples of {multiple} from 1 to {dim}")
    return ladder


def value_plan_for_cr(
    groups: list[Group], sum_sq, alpha, mass, budget: float, projection: str, multiple: int,
    min_row_lookups: float, tolerance: float, widths: Optional[Sequence[int]] = None, bits: Optional[int] = None,
) -> tuple[StructuredPlan, float]:
    """``plan_by_value`` spending at least ``budget / (1 + tolerance)`` bytes, and the
    ``min_row_lookups`` it used: halved (down to 0: a row per id) while every column fits
    with fewer bytes, as the budget then has room for more rows.

    Raises:
        ValueError: when even a row per id and every column that scores above zero spend
            less (the message names the highest CR reachable).
    """
    while True:
        plan = plan_by_value(groups, sum_sq, alpha, mass, budget, projection, multiple, min_row_lookups, widths, bits)
        if plan.embedding_bytes(projection, bits) * (1 + tolerance) >= budget:
            return plan, min_row_lookups
        if min_row_lookups <= 1:
            break
        min_row_lookups = min_row_lookups / 2 if min_row_lookups > 2 else 0
    cr = plan.unpruned_bytes() / budget
    landed = plan.compression_ratio(projection, bits)
    raise ValueError(
        f"compression ratio {cr:g} is not reachable within {tolerance:.0%}: every column that "
        f"scores above zero fits and reaches CR {landed:.4g}; ask for CR ≤ {landed:.4g}"
    )
