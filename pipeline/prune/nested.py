"""Nested column orders: every group of a feature keeps a prefix of one column order.

A plan is *nested* when each feature has a column order whose first ``width`` columns
are exactly what each of its groups keeps. The repacked layout (``sharding.column_slabs``)
then stores a feature as column slabs, positions ``[w_i, w_{i+1})`` of the order between
consecutive distinct widths, each shared by every group at least that wide: keys and
pooled width grow with a feature's distinct widths, never with its number of groups
(NIS's embedding blocks: vocabulary ranges × column blocks).

``nested_columns`` chooses the order for given widths, position by position: the free
column worth most to the groups that store that position, ``Σ (mass_g + 1) × score_gj``
over the feature's groups wider than it (``mass`` is the train occurrences of a group's
ids; the 1 lets a group with unseen ids still count). ``feature_columns`` reads the
order back from a plan and refuses a plan that is not nested.

Example:
    >>> from pipeline.prune.plan import Group, GroupPlan, StructuredPlan
    >>> groups = [Group("a", 0, 0, 2), Group("a", 1, 2, 10)]
    >>> scores = np.array([[1.0, 3.0, 2.0, 0.0], [0.5, 0.1, 0.2, 0.4]])
    >>> nested_columns(groups, [2, 1], scores, mass=[0, 0])  # group 1's best, 0, is nobody else's
    [(1, 2), (1,)]
    >>> plan = StructuredPlan((GroupPlan(groups[0], (1, 2), 1), GroupPlan(groups[1], (1,), 1)), 4, 0.0)
    >>> feature_columns(plan, ["a"])
    {'a': FeatureColumns(order=(1, 2), widths=(1, 2))}
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pipeline.prune.plan import Group, StructuredPlan

AGAIN = "a plan of an older dnis prune: prune again"


@dataclass(frozen=True)
class FeatureColumns:
    """One feature's nested columns: a group of width ``w`` keeps ``order[:w]``.

    Attributes:
        order: the widest group's columns, in nesting order.
        widths: the distinct widths of the feature's kept groups, ascending.
    """

    order: tuple[int, ...]
    widths: tuple[int, ...]

    def slabs(self) -> list[tuple[int, int]]:
        """Positions ``[lo, hi)`` of each column slab: between consecutive widths."""
        return list(zip((0,) + self.widths[:-1], self.widths))


def nested_columns(groups: Sequence["Group"], widths, scores: np.ndarray, mass) -> list[tuple[int, ...]]:
    """Each group's kept columns (sorted): the first ``widths[i]`` of its feature's order.

    Args:
        groups: the plan's groups.
        widths: columns each group keeps (0 drops it).
        scores: ``[G, K]`` column scores (``plan.column_scores``).
        mass: train occurrences of each group's ids (``plan.group_mass``).
    """
    widths = np.asarray(widths, dtype=np.int64)
    weighted = (np.asarray(mass, dtype=np.float64) + 1.0)[:, None] * np.asarray(scores, dtype=np.float64)
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g.key].append(i)
    kept: list[tuple[int, ...]] = [()] * len(groups)
    for rows in members.values():
        rows = np.asarray(rows)
        order: list[int] = []
        free = np.ones(weighted.shape[1], dtype=bool)
        for position in range(int(widths[rows].max())):
            worth = weighted[rows[widths[rows] > position]].sum(axis=0)
            column = int(np.argmax(np.where(free, worth, -np.inf)))
            order.append(column)
            free[column] = False
        for i in rows:
            kept[i] = tuple(sorted(order[: widths[i]]))
    return kept


def feature_columns(plan: "StructuredPlan", keys: Sequence[str]) -> dict[str, FeatureColumns]:
    """Per key with kept groups, its nested columns.

    Raises:
        ValueError: naming a group that stores columns it does not keep (padding), or
            whose columns are not a prefix of its feature's order.
    """
    by_width: dict[str, dict[int, set]] = {key: {} for key in keys}
    for g in plan.groups:
        if not g.width:
            continue
        where = f"group {g.group.key} ids [{g.group.start}, {g.group.stop})"
        if len(g.columns) != g.width:
            raise ValueError(f"{where} keeps {len(g.columns)} columns at width {g.width}: "
                             "a repacked plan keeps every column it stores")
        seen = by_width[g.group.key].setdefault(g.width, set(g.columns))
        if seen != set(g.columns):
            raise ValueError(f"{where} keeps {sorted(g.columns)}, another group of width {g.width} {sorted(seen)}: "
                             f"not nested ({AGAIN})")
    out = {}
    for key, sets in by_width.items():
        order: list[int] = []
        for width in sorted(sets):
            if not set(order) <= sets[width]:
                raise ValueError(f"feature {key}: its width-{width} groups keep {sorted(sets[width])}, "
                                 f"not every column of its narrower groups {sorted(order)}: not nested ({AGAIN})")
            order += sorted(sets[width] - set(order))
        if order:
            out[key] = FeatureColumns(tuple(order), tuple(sorted(sets)))
    return out
