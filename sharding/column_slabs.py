"""Where the repacked model keeps each id's values: column slabs of nested plans.

In a nested plan (``plans.structured``) a group of feature ``f`` at width ``w``
keeps the first ``w`` columns of ``f``'s column order. A *slab* is the positions
``[lo, hi)`` of that order between two consecutive distinct widths of ``f``; it stores
the rows of every group at least ``hi`` wide, stacked in id order. A group's row is thus
split over the slabs below its width, and each value is stored once:

    feature "a", widths 8 (ids 0-9), 4 (ids 10-99), 0 (ids 100-999)
    slab a:0-4   rows of ids 0-99    (100 × 4)
    slab a:4-8   rows of ids 0-9     ( 10 × 4)

One table and one pooled key per slab: keys and pooled width grow with the distinct
widths of a feature (its pooled slabs together are as wide as its widest group, at most
``K``), never with its number of groups. ``GroupIndex`` finds each id's group with one
``searchsorted``, as groups are id ranges of frequency-ranked ids.

Example:
    >>> from plans.structured import Group, GroupPlan, StructuredPlan
    >>> plan = StructuredPlan((GroupPlan(Group("a", 0, 0, 10), tuple(range(8))),
    ...                        GroupPlan(Group("a", 1, 10, 100), (0, 1, 2, 3)),
    ...                        GroupPlan(Group("a", 2, 100, 1000), ())), embedding_dim=8, tau=0.0)
    >>> [(s.name, s.rows, s.width) for s in ColumnSlabs(plan, ["a"]).slabs]
    [('a:0-4', 100, 4), ('a:4-8', 10, 4)]
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from plans.structured import GroupPlan, StructuredPlan, feature_columns


def kept_groups(plan: StructuredPlan, keys: Sequence[str]) -> dict[str, list[GroupPlan]]:
    """Per key, its groups with width > 0, in id order."""
    out: dict[str, list[GroupPlan]] = {key: [] for key in keys}
    for g in plan.groups:
        if g.width > 0:
            out[g.group.key].append(g)
    for groups in out.values():
        groups.sort(key=lambda g: g.group.start)
    return out


@dataclass(frozen=True)
class Slab:
    """Positions ``[lo, hi)`` of feature ``key``'s column order (model columns
    ``columns``), holding the rows of ``groups`` (every group at least ``hi`` wide, in
    id order) stacked."""

    key: str
    lo: int
    hi: int
    columns: tuple[int, ...]
    groups: tuple[GroupPlan, ...]

    @property
    def name(self) -> str:
        """The slab's KJT key (its table is ``t_<name>``)."""
        return f"{self.key}:{self.lo}-{self.hi}"

    @property
    def width(self) -> int:
        return self.hi - self.lo

    @property
    def rows(self) -> int:
        return sum(g.stored_rows for g in self.groups)

    def first_rows(self) -> list[int]:
        """Row of each group's first id in the slab's table."""
        return [0, *accumulate(g.stored_rows for g in self.groups)][:-1]


class ColumnSlabs:
    """Every slab of a nested plan (``slabs``, in ``keys`` order, then by position; and
    ``by_key`` for the keys with any).

    Raises:
        ValueError: for a plan that is not nested (``feature_columns``).
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.embedding_dim = plan.embedding_dim
        self.features = feature_columns(plan, self.keys)
        kept = kept_groups(plan, self.keys)
        self.by_key = {
            key: [Slab(key, lo, hi, columns.order[lo:hi], tuple(g for g in kept[key] if g.width >= hi))
                  for lo, hi in columns.slabs()]
            for key, columns in self.features.items()
        }
        self.slabs = [slab for slabs in self.by_key.values() for slab in slabs]


@dataclass(frozen=True)
class LocatedIds:
    """Every id of a batch with its bag (``segment``: key-major, then row), its field
    position in ``GroupIndex.keys``, its group slot and ``folded``: the id whose row it
    reads (itself, or for a group of shared rows ``GroupIndex.fold``'s)."""

    ids: torch.Tensor
    segment: torch.Tensor
    field: torch.Tensor
    slot: torch.Tensor
    folded: torch.Tensor


NO_FOLD = torch.iinfo(torch.int64).max  # the modulus of groups whose ids keep their own rows


def fold(ids: torch.Tensor, start: torch.Tensor, modulus: torch.Tensor) -> torch.Tensor:
    """``start + (ids - start) mod modulus``: ids of a group of shared rows onto its first
    ``modulus`` ids (``NO_FOLD`` leaves an id as it is).

    Example:
        >>> fold(torch.tensor([10, 13, 14, 99]), torch.tensor([10, 10, 10, 0]), torch.tensor([4, 4, 4, NO_FOLD]))
        tensor([10, 13, 10, 99])
    """
    return start + torch.remainder(ids - start, modulus)


def fold_constants(groups: Sequence[GroupPlan | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, modulus)`` of ``fold`` for each of ``groups`` (``None``: no group)."""
    start = [0 if g is None else g.group.start for g in groups]
    modulus = [NO_FOLD if g is None or g.buckets is None else g.buckets for g in groups]
    return torch.tensor(start, dtype=torch.int64), torch.tensor(modulus, dtype=torch.int64)


class GroupIndex:
    """All groups of a plan on one sorted axis (feature offset + id), so one
    ``searchsorted`` finds the group of every id of a batch.

    ``slots[i]`` is the group of slot ``i``; each feature's slots (``key_slots[key]``)
    end with a ``None`` placeholder. ``stops[f]`` is the end of feature ``f``'s last
    group: an id past it would land in the next feature's first group, so ids are checked
    against it.
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.slots: list[GroupPlan | None] = []
        self.key_slots: dict[str, range] = {}
        starts, offsets, stops, offset = [], [], [], 0
        for key in self.keys:
            groups = sorted((g for g in plan.groups if g.group.key == key), key=lambda g: g.group.start)
            offsets.append(offset)
            self.key_slots[key] = range(len(self.slots), len(self.slots) + len(groups) + 1)
            for g in groups:
                starts.append(offset + g.group.start)
                self.slots.append(g)
            stops.append(groups[-1].group.stop if groups else 0)
            offset += stops[-1]
            starts.append(offset)
            self.slots.append(None)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self.stops = torch.tensor(stops, dtype=torch.int64)
        self.slot_start, self.slot_modulus = fold_constants(self.slots)
        self.folds = any(g is not None and g.buckets is not None for g in self.slots)

    def locate(self, features: KeyedJaggedTensor) -> LocatedIds:
        """Group slots of every id of ``features`` (whose keys are ``keys``, any order).

        Raises:
            ValueError: naming an id outside its feature's groups.
        """
        if sorted(features.keys()) != sorted(self.keys):
            raise ValueError(f"batch keys {features.keys()} are not the plan's keys {self.keys}")
        position = {key: i for i, key in enumerate(self.keys)}
        ids = features.values().long()
        segment = torch.repeat_interleave(
            torch.arange(features.lengths().numel()), features.lengths().long(), output_size=ids.numel()
        )
        field = torch.tensor([position[k] for k in features.keys()], dtype=torch.int64)[segment // features.stride()]
        slot = (torch.searchsorted(self.starts, self.offsets[field] + ids, right=True) - 1).clamp(min=0)
        if ids.numel():
            bad = (ids < 0) | (ids >= self.stops[field])
            if bool(bad.any()):
                raise ValueError(f"id {int(ids[bad][0])} is outside the ranges of the prune plan's groups")
        folded = fold(ids, self.slot_start[slot], self.slot_modulus[slot]) if self.folds else ids
        return LocatedIds(ids, segment, field, slot, folded)
