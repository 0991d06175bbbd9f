"""Width plans of the baselines that need no trained model: MDE and random search.

Both assign a width to every (feature, block) group of the DNIS frequency blocking, so
they ship through the same repacked tables (``sharding.repack``) and count their bytes
with the same ``plan_bytes`` as the structured prune. Widths may be any number of
columns (``multiple=1``): narrow tables are data-parallel (``sharding.dmp``).

- **MDE** (Ginart et al., mixed dimension embeddings): a group's width grows with the
  popularity of its ids, ``round(λ · p^T)`` capped at K, where ``p`` is the group's mean
  train count per id and ``T`` the temperature (0: uniform, 1: proportional). λ is
  found by bisection: the widest plan within the byte budget. Learned projections to K.
- **Random** (the DNIS paper's random-search baseline): descending per-block widths
  drawn uniformly from ``0..K``, kept when the bytes land in
  ``[fill · budget, budget]``; the caller trains several and keeps the best on
  validation. Fixed selection of the first columns.

Example:
    >>> counts = {"a": [[100, 2], [1, 98]]}  # ids 0-1 seen 100 times, 2-99 once
    >>> groups = [Group("a", 0, 0, 2), Group("a", 1, 2, 100)]
    >>> plan = mde_plan(groups, counts, 8, budget=1400, temperature=0.5)
    >>> [g.width for g in plan.groups], plan.embedding_bytes("learned")
    ([8, 2], 1120)
"""

from __future__ import annotations

import numpy as np

from pipeline.prune.plan import group_mass
from plans.bytes import plan_bytes
from plans.structured import Group, GroupPlan, StructuredPlan


def width_plan(groups: list[Group], widths, dim: int) -> StructuredPlan:
    """Group ``i`` keeps its first ``widths[i]`` columns, any width (``multiple=1``)."""
    plans = tuple(GroupPlan(g, tuple(range(int(w))), multiple=1) for g, w in zip(groups, widths))
    return StructuredPlan(plans, dim, tau=0.0)


def _bytes(groups: list[Group], widths: np.ndarray, dim: int, projection: str) -> int:
    return plan_bytes([g.key for g in groups], [g.rows for g in groups], widths, dim, projection)


def mde_plan(
    groups: list[Group], counts: dict, dim: int, budget: float, temperature: float,
    projection: str = "learned",
) -> StructuredPlan:
    """The widest MDE plan (``round(λ p^T)``, capped at ``dim``) within ``budget`` bytes.

    Raises:
        ValueError: when even λ → 0 (every group dropped but the most popular at width
            1) does not fit.
    """
    rows = np.array([g.rows for g in groups], dtype=np.float64)
    popularity = group_mass(groups, counts) / rows
    weight = np.where(popularity > 0, popularity, 0.0) ** temperature

    def widths(scale: float) -> np.ndarray:
        return np.minimum(np.rint(scale * weight / weight.max()), dim).astype(np.int64)

    lo, hi = 0.0, float(dim) * weight.max() / max(weight[weight > 0].min(), 1e-12) + 1
    if _bytes(groups, widths(1.0), dim, projection) > budget:
        raise ValueError(f"MDE: a budget of {budget:,.0f} bytes is below one column of the most popular group")
    lo = 1.0
    for _ in range(60):  # bytes grow with λ: bisect for the largest λ that fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _bytes(groups, widths(mid), dim, projection) <= budget else (lo, mid)
    return width_plan(groups, widths(lo), dim)


def random_plan(
    groups: list[Group], dim: int, budget: float, rng: np.random.Generator,
    projection: str = "selection", fill: float = 0.9, tries: int = 20_000,
) -> StructuredPlan:
    """Descending random widths per α row (block) within ``budget``: the first draw that
    spends at least ``fill · budget``, else the fullest of ``tries`` draws (integer
    widths cannot always come that close when one block holds most ids).

    Raises:
        ValueError: when no draw fits the budget at all.
    """
    blocks = np.array([g.block for g in groups])
    num_blocks = int(blocks.max()) + 1
    best, best_bytes = None, -1
    for _ in range(tries):
        widths = np.sort(rng.integers(0, dim + 1, size=num_blocks))[::-1][blocks]
        spent = _bytes(groups, widths, dim, projection)
        if best_bytes < spent <= budget:
            best, best_bytes = widths, spent
            if spent >= fill * budget:
                break
    if best is None:
        raise ValueError(f"random search: no descending width sequence fits {budget:,.0f} bytes")
    return width_plan(groups, best, dim)
