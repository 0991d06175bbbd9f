"""The shipped model's embeddings: the kept columns of each (feature, block, id range)
group as one dense table of its own width, all in one ``EmbeddingBagCollection``, and
a multi-size embedding (ME) projection back to the model's dimension ``K``.

``KeyRewriter`` (a batch transform, run by the loader before the pipeline) moves each
id of feature ``f`` into the key of its group, ``f#i``, as a local row
``id - group.start``; ids of dropped groups (width 0) leave the batch, so they embed to
zeros exactly as the structurally pruned α-model gives them. No per-id lookup table is
needed because groups are id ranges of frequency-ranked ids.

``RepackedEmbedding`` sums, per feature, its groups' pooled rows times their projection
``P_g`` (``width × K``): with ``projection="selection"`` ``P_g`` is the fixed 0/1 matrix
that puts kept column ``i`` back at index ``columns[i]`` (outputs equal the pruned
α-model's), with ``"learned"`` it is a trainable matrix initialised from it (NIS-ME).

Example:
    >>> from pipeline.data.batch import single_hot_kjt
    >>> from pipeline.prune.plan import Group, GroupPlan, StructuredPlan
    >>> plan = StructuredPlan((GroupPlan(Group("a", 0, 0, 3), (0, 2)),
    ...                        GroupPlan(Group("a", 1, 3, 5), ())), embedding_dim=4, tau=0.1)
    >>> kjt = single_hot_kjt(["a"], torch.tensor([[1, 4]]))
    >>> KeyRewriter(plan, ["a"])(kjt).lengths().tolist()   # row 1's id 4 is dropped
    [1, 0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.prune.plan import GroupPlan, StructuredPlan

PROJECTIONS = ("selection", "learned")


def group_key(key: str, index: int) -> str:
    """Feature name of the ``index``-th kept group of ``key``."""
    return f"{key}#{index}"


def kept_groups(plan: StructuredPlan, keys: Sequence[str]) -> dict[str, list[GroupPlan]]:
    """Per key, its groups with width > 0, in id order."""
    out: dict[str, list[GroupPlan]] = {key: [] for key in keys}
    for g in plan.groups:
        if g.width > 0:
            out[g.group.key].append(g)
    for groups in out.values():
        groups.sort(key=lambda g: g.group.start)
    return out


def repacked_table_configs(
    plan: StructuredPlan, keys: Sequence[str], init_scale: float = 0.01
) -> list[EmbeddingBagConfig]:
    """One table per kept group, ``stop - start`` rows of the group's width, initialised
    from ``uniform(-init_scale, init_scale)`` like the full tables (what a plan trained
    from scratch starts from; a retrain from searched weights overwrites it)."""
    return [
        EmbeddingBagConfig(
            name=f"t_{group_key(key, i)}",
            num_embeddings=g.group.stop - g.group.start,
            embedding_dim=g.width,
            feature_names=[group_key(key, i)],
            weight_init_min=-init_scale,
            weight_init_max=init_scale,
        )
        for key, groups in kept_groups(plan, keys).items()
        for i, g in enumerate(groups)
    ]


@dataclass(frozen=True)
class LocatedIds:
    """Every id of a batch with its bag (``segment``: key-major, then row), its field
    position in ``GroupIndex.keys`` and its group slot."""

    ids: torch.Tensor
    segment: torch.Tensor
    field: torch.Tensor
    slot: torch.Tensor


class GroupIndex:
    """All groups of a plan on one sorted axis (feature offset + id), so one
    ``searchsorted`` finds the group of every id of a batch.

    ``slots[i]`` is the group of slot ``i``; each feature's slots end with ``None``,
    which catches ids past its last group.
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.slots: list[GroupPlan | None] = []
        starts, offsets, offset = [], [], 0
        for key in self.keys:
            groups = sorted((g for g in plan.groups if g.group.key == key), key=lambda g: g.group.start)
            offsets.append(offset)
            for g in groups:
                starts.append(offset + g.group.start)
                self.slots.append(g)
            offset += groups[-1].group.stop if groups else 0
            starts.append(offset)
            self.slots.append(None)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self._outside = torch.tensor([g is None for g in self.slots])

    def locate(self, features: KeyedJaggedTensor) -> LocatedIds:
        """Group slots of every id of ``features`` (whose keys are ``keys``, any order).

        Raises:
            ValueError: naming an id outside its feature's groups (not while exporting).
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
        if ids.numel() and not torch.compiler.is_compiling():  # an exported graph has no data checks
            bad = self._outside[slot] | (ids < 0)
            if bool(bad.any()):
                raise ValueError(f"id {int(ids[bad][0])} is outside the ranges of the prune plan's groups")
        return LocatedIds(ids, segment, field, slot)


class KeyRewriter:
    """Batch transform: each id of ``keys`` into its kept group's key as a local row.

    Vectorised over the whole batch: the ``GroupIndex`` lookup, then one stable sort by
    (output key, row). Ids of dropped groups leave the batch.
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str]) -> None:
        self.index = GroupIndex(plan, keys)
        kept = kept_groups(plan, keys)
        self.out_keys = [group_key(key, i) for key in self.index.keys for i in range(len(kept[key]))]
        out_index = {id(g): i for i, g in enumerate(g for key in self.index.keys for g in kept[key])}
        self._outs = torch.tensor([out_index.get(id(g), -1) for g in self.index.slots], dtype=torch.int64)
        self._local_starts = torch.tensor([g.group.start if g else 0 for g in self.index.slots], dtype=torch.int64)

    def __call__(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        batch = features.stride()
        found = self.index.locate(features)
        out = self._outs[found.slot]
        keep = out >= 0
        order_key = out[keep] * batch + found.segment[keep] % batch
        order = torch.sort(order_key, stable=True).indices
        weights = features.weights_or_none()
        return KeyedJaggedTensor(
            keys=self.out_keys,
            values=(found.ids[keep] - self._local_starts[found.slot[keep]])[order],
            lengths=torch.bincount(order_key, minlength=len(self.out_keys) * batch).to(features.lengths().dtype),
            weights=None if weights is None else weights[keep][order],
            stride=batch,
        )


# The planner would replicate the many small tables (data parallel): their dense
# gradients then cost a copy and an all-reduce of every table each step (5x slower
# retraining on 521 tables). Sharded kinds train them sparsely in the fused kernel.
SHARDED_KINDS = ("table_wise", "column_wise", "table_column_wise")


def repacked_constraints(module: "RepackedEmbedding") -> dict[str, ParameterConstraints]:
    """Planner constraints for the repacked tables: any sharded kind, never replicated."""
    return {
        c.name: ParameterConstraints(sharding_types=list(SHARDED_KINDS))
        for c in module.ebc.embedding_bag_configs()
    }


def selection_matrix(group: GroupPlan, embedding_dim: int) -> torch.Tensor:
    """``width × K`` 0/1 matrix putting kept column ``i`` back at ``columns[i]``."""
    p = torch.zeros(group.width, embedding_dim)
    p[torch.arange(len(group.columns)), torch.tensor(group.columns, dtype=torch.int64)] = 1.0
    return p


class RepackedEmbedding(nn.Module):
    """Mixed-width tables + ME projection: ``[B, F, K]`` in ``keys`` order, like the α-EBC.

    Args:
        plan: the structured prune plan (kept columns per group).
        keys: the model's feature keys, in field order.
        projection: ``selection`` (fixed, exact) or ``learned`` (NIS-ME).
        weighted: whether features carry weights (the paper's dense fields).
        device: where the tables go (``meta`` before sharding).
        init_scale: tables start from ``uniform(-init_scale, init_scale)``.
    """

    def __init__(
        self, plan: StructuredPlan, keys: Sequence[str], projection: str = "selection",
        weighted: bool = False, device: torch.device | None = None, init_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"projection {projection!r}; known: {PROJECTIONS}")
        self.keys = list(keys)
        self.embedding_dim = plan.embedding_dim
        groups = kept_groups(plan, keys)
        self.ebc = EmbeddingBagCollection(
            repacked_table_configs(plan, keys, init_scale), is_weighted=weighted, device=device
        )
        self._names = {key: [group_key(key, i) for i in range(len(g))] for key, g in groups.items()}
        self._first = next(n for names in self._names.values() for n in names)
        self.learned = projection == "learned"
        self.projections = nn.ParameterDict()
        for key, key_groups in groups.items():
            if not key_groups:
                continue
            if self.learned:
                p = torch.cat([selection_matrix(g, self.embedding_dim) for g in key_groups])
                self.projections[key] = nn.Parameter(p)
            else:  # where each stored column goes; padding slots go to a spare column K
                where = [list(g.columns) + [self.embedding_dim] * (g.width - len(g.columns)) for g in key_groups]
                index = torch.tensor([j for w in where for j in w], dtype=torch.int64)
                self.register_buffer(_column_buffer(key), index, persistent=False)

    @property
    def num_fields(self) -> int:
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        # Per group by name (views of one split: its backward is one cat). Slicing one
        # wide tensor instead made every slice's backward zero-fill the whole width
        # (10x slower steps); KeyedTensor.regroup costs a full permute on CPU.
        pooled = self.ebc(features).to_dict()
        out = []
        for key in self.keys:
            names = self._names.get(key)
            if not names:
                out.append(pooled[self._first].new_zeros(pooled[self._first].shape[0], self.embedding_dim))
                continue
            stored = torch.cat([pooled[name] for name in names], dim=1)
            out.append(self._project(key, stored))
        return torch.stack(out, dim=1)

    def _project(self, key: str, stored: torch.Tensor) -> torch.Tensor:
        """``[B, stored width] -> [B, K]``: the learned matrix, or the selection as an
        index add (exact, and no ``width × K`` matrix to store or multiply)."""
        if self.learned:
            return stored @ self.projections[key]
        index = getattr(self, _column_buffer(key))
        spare = stored.new_zeros(stored.shape[0], self.embedding_dim + 1)
        return spare.index_add(1, index, stored)[:, : self.embedding_dim]


def _column_buffer(key: str) -> str:
    return f"_columns_{key}"


def repacked_weights(
    plan: StructuredPlan, keys: Sequence[str], tables: dict[str, torch.Tensor], alpha: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Table weights of ``RepackedEmbedding.ebc`` from the searched full-width tables.

    ``tables[key]`` is the key's ``[rows, K]`` table (whole, or the rows of the groups
    this process builds); α is folded into the values: ``E[id, cols] * α[block, cols]``,
    zero-padded to the group's width.
    """
    weights = {}
    for key, groups in kept_groups(plan, keys).items():
        for i, g in enumerate(groups):
            cols = torch.tensor(g.columns, dtype=torch.int64)
            values = torch.zeros(g.group.stop - g.group.start, g.width)
            values[:, : len(cols)] = tables[key][g.group.start : g.group.stop][:, cols] * alpha[g.group.block, cols]
            weights[f"t_{group_key(key, i)}"] = values
    return weights


def load_repacked_weights(module: RepackedEmbedding, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``repacked_weights`` into an unsharded ``RepackedEmbedding``."""
    bags = module.ebc.embedding_bags
    for name, values in weights.items():
        with torch.no_grad():
            bags[name].weight.copy_(values)
