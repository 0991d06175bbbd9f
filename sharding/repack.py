"""The shipped model's embeddings: the kept columns of each (feature, block, id range)
group as one dense table of its own width, all in one ``EmbeddingBagCollection``, and
a multi-size embedding (ME) projection back to the model's dimension ``K``.

``rewrite_keys`` (a batch transform, run by the loader before the pipeline) moves each
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
    >>> rewrite_keys(kjt, plan, ["a"]).lengths().tolist()   # row 1's id 4 is dropped
    [1, 0]
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.prune.plan import GroupPlan, StructuredPlan
from sharding.field_embedding import pooled_by_name

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


def repacked_table_configs(plan: StructuredPlan, keys: Sequence[str]) -> list[EmbeddingBagConfig]:
    """One table per kept group, ``stop - start`` rows of the group's width."""
    return [
        EmbeddingBagConfig(
            name=f"t_{group_key(key, i)}",
            num_embeddings=g.group.stop - g.group.start,
            embedding_dim=g.width,
            feature_names=[group_key(key, i)],
        )
        for key, groups in kept_groups(plan, keys).items()
        for i, g in enumerate(groups)
    ]


def rewrite_keys(features: KeyedJaggedTensor, plan: StructuredPlan, keys: Sequence[str]) -> KeyedJaggedTensor:
    """Batch transform: each id of ``keys`` into its kept group's key as a local row."""
    per_key = features.to_dict()
    weighted = features.weights_or_none() is not None
    out_keys, values, lengths, weights = [], [], [], []
    for key, groups in kept_groups(plan, keys).items():
        jt = per_key[key]
        ids, batch = jt.values(), jt.lengths().numel()
        row = torch.repeat_interleave(torch.arange(batch), jt.lengths().long())
        for i, g in enumerate(groups):
            hit = (ids >= g.group.start) & (ids < g.group.stop)
            out_keys.append(group_key(key, i))
            lengths.append(torch.bincount(row[hit], minlength=batch).to(jt.lengths().dtype))
            values.append(ids[hit] - g.group.start)
            if weighted:
                weights.append(jt.weights()[hit])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=out_keys,
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int32),
        weights=(torch.cat(weights) if weights else torch.zeros(0)) if weighted else None,
    )


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
    """

    def __init__(
        self, plan: StructuredPlan, keys: Sequence[str], projection: str = "selection",
        weighted: bool = False, device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"projection {projection!r}; known: {PROJECTIONS}")
        self.keys = list(keys)
        self.embedding_dim = plan.embedding_dim
        groups = kept_groups(plan, keys)
        self.ebc = EmbeddingBagCollection(
            repacked_table_configs(plan, keys), is_weighted=weighted, device=device
        )
        self._names = {key: [group_key(key, i) for i in range(len(g))] for key, g in groups.items()}
        self._all_names = [name for names in self._names.values() for name in names]
        self.projections = nn.ParameterDict()
        for key, key_groups in groups.items():
            if key_groups:
                p = torch.cat([selection_matrix(g, self.embedding_dim) for g in key_groups])
                self.projections[key] = nn.Parameter(p, requires_grad=projection == "learned")

    @property
    def num_fields(self) -> int:
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = pooled_by_name(self.ebc(features), self._all_names)
        out, offset = [], 0
        for key in self.keys:
            if key not in self.projections:
                out.append(pooled.new_zeros(pooled.shape[0], self.embedding_dim))
                continue
            p = self.projections[key]
            out.append(pooled[:, offset : offset + p.shape[0]] @ p)
            offset += p.shape[0]
        return torch.stack(out, dim=1)


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
