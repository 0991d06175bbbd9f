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
ids; the 1 lets a group with unseen ids still count). ``plans.structured.feature_columns``
reads the order back from a plan and refuses a plan that is not nested.

Example:
    >>> groups = [Group("a", 0, 0, 2), Group("a", 1, 2, 10)]
    >>> scores = np.array([[1.0, 3.0, 2.0, 0.0], [0.5, 0.1, 0.2, 0.4]])
    >>> nested_columns(groups, [2, 1], scores, mass=[0, 0])  # group 1's best, 0, is nobody else's
    [(1, 2), (1,)]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from plans.structured import Group


def nested_columns(groups: Sequence[Group], widths, scores: np.ndarray, mass) -> list[tuple[int, ...]]:
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
