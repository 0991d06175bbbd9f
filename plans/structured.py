"""Structured prune plans: which columns of each (feature, block, id range) group ship.

A group is an id range of one feature inside one frequency block (ids are frequency
ranks, so a block's ids of a feature are one range). A plan gives each group its stored
columns; its width is their number rounded up to a multiple of 4 (FBGEMM tables need
it), and a group of width 0 is dropped: its ids embed to zeros. A plan is *nested* when
each feature has a column order whose first ``w`` columns are exactly what each of its
groups of width ``w`` keeps; the repacked layout (``sharding.column_slabs``) then shares
column slabs between a feature's groups. ``feature_columns`` reads the order back from a
plan and refuses a plan that is not nested.

``pipeline.prune`` chooses the columns (``plan.py``, ``nested.py``, ``knapsack.py``);
bytes and CR are counted by ``plans.bytes``.

Example:
    >>> groups = [Group("a", 0, 0, 2), Group("a", 1, 2, 10)]
    >>> plan = StructuredPlan((GroupPlan(groups[0], (1, 2), 1), GroupPlan(groups[1], (1,), 1)), 4, 0.0)
    >>> feature_columns(plan, ["a"])
    {'a': FeatureColumns(order=(1, 2), widths=(1, 2))}
    >>> [g.width for g in plan.groups], [GroupPlan(groups[1], (1,)).width]
    ([2, 1], [4])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from plans.bytes import BUCKETS_BYTES, plan_bytes, unpruned_bytes

WIDTH_MULTIPLE = 4
AGAIN = "a plan of an older dnis prune: prune again"


@dataclass(frozen=True)
class Group:
    """Ids ``[start, stop)`` of feature ``key``, all in α row ``block``."""

    key: str
    block: int  # α row: blocking.row_offset(key) + local block
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class GroupPlan:
    """The stored columns of one group (sorted); ``()`` drops the group.

    ``multiple`` is the width granularity: 4 for the pruned tables (FBGEMM's sharded
    kernels need it), 1 for the baselines' narrow tables (1-3 columns), which
    ``sharding.dmp`` keeps data-parallel, the one TorchRec kernel that takes any width.

    ``buckets`` (``None``: one row per id) makes the group's ids share that many rows:
    id ``i`` reads row ``(i - start) mod buckets`` of the group (``fold``), the hashing
    trick for ids seen too rarely to learn a row of their own.
    """

    group: Group
    columns: tuple[int, ...]
    multiple: int = WIDTH_MULTIPLE
    buckets: Optional[int] = None

    def __post_init__(self) -> None:
        if self.buckets is not None and not 0 < self.buckets < self.group.rows:
            raise ValueError(f"{self.group}: {self.buckets} shared rows; expected 1..{self.group.rows - 1}")

    @property
    def width(self) -> int:
        """Stored columns: ``len(columns)`` rounded up to a multiple of ``multiple``."""
        return -(-len(self.columns) // self.multiple) * self.multiple

    @property
    def stored_rows(self) -> int:
        return self.group.rows if self.buckets is None else self.buckets


@dataclass(frozen=True)
class StructuredPlan:
    """Per group, its stored columns; ``tau`` is the score threshold that gave them."""

    groups: tuple[GroupPlan, ...]
    embedding_dim: int
    tau: float

    def embedding_bytes(self, projection: str, bits: Optional[int] = None) -> int:
        """Serving bytes of all groups: values (fp32, or quantized to ``bits``), range
        starts and projections."""
        keys = [g.group.key for g in self.groups]
        rows = [g.stored_rows for g in self.groups]
        widths = [g.width for g in self.groups]
        shared = sum(g.buckets is not None for g in self.groups)
        return plan_bytes(keys, rows, widths, self.embedding_dim, projection, bits) + shared * BUCKETS_BYTES

    def unpruned_bytes(self) -> int:
        return unpruned_bytes(sum(g.group.rows for g in self.groups), self.embedding_dim)

    @property
    def num_alpha_rows(self) -> int:
        """Rows of the α matrix the groups' ``block`` indices point into."""
        return 1 + max(g.group.block for g in self.groups)

    def compression_ratio(self, projection: str, bits: Optional[int] = None) -> float:
        """Unpruned (fp32) ÷ pruned embedding bytes (quantized to ``bits``: the compound CR)."""
        return self.unpruned_bytes() / self.embedding_bytes(projection, bits)

    def to_json(self) -> dict:
        return {
            "embedding_dim": self.embedding_dim,
            "tau": self.tau,
            "groups": [
                {"key": g.group.key, "block": g.group.block, "start": g.group.start,
                 "stop": g.group.stop, "columns": list(g.columns), "multiple": g.multiple,
                 **({} if g.buckets is None else {"buckets": g.buckets})}
                for g in self.groups
            ],
        }

    @classmethod
    def from_json(cls, doc: dict) -> "StructuredPlan":
        groups = tuple(
            GroupPlan(
                Group(g["key"], g["block"], g["start"], g["stop"]), tuple(g["columns"]),
                g.get("multiple", WIDTH_MULTIPLE), g.get("buckets"),
            )
            for g in doc["groups"]
        )
        return cls(groups, doc["embedding_dim"], float(doc["tau"]))


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


def feature_columns(plan: StructuredPlan, keys: Sequence[str]) -> dict[str, FeatureColumns]:
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
