"""Serving ids: a repacked feature's ids renumbered so that every slab stores a prefix.

In training an id is its frequency rank, and a slab (``sharding.column_slabs``) stores the
rows of the groups at least as wide as its columns, in id order: ``SingleHotKeyRewriter``
finds each id's segment, its shift into every slab and whether the slab stores it (a
dozen small steps, most of a value plan's serving overhead at batch 1 and 64). Serving
may number ids as it likes, since its vocabulary maps raw values to them: ``ServingRows``
numbers each feature's stored rows widest group first (a group of shared rows as its
``buckets`` rows), and the dropped groups' ids all as the next number. Each slab's table
is re-laid in that order with one zero row at the end (``relay``), so slab ``s`` stores
exactly the ids below ``n_s`` and an id reads row ``min(id, n_s)`` there: every slab
takes its feature's ids, one ``minimum`` each, and a bag per (slab, row) of the batch.
The lookups the slab does not store read the zero row, so no mask and no compaction.

    feature "a": ids 0-9 width 8, ids 10-99 width 4, ids 100-999 width 0
    serving ids: 0-9 -> 0-9, 10-99 -> 10-99, 100-999 -> 100
    slab a:0-4 reads min(id, 100) (rows 0-99 and a zero row), a:4-8 min(id, 10)

Example:
    >>> from plans.structured import Group, GroupPlan, StructuredPlan
    >>> plan = StructuredPlan((GroupPlan(Group("a", 0, 0, 4), (0, 1, 2, 3)),
    ...                        GroupPlan(Group("a", 1, 4, 10), (0, 1, 2, 3, 4, 5, 6, 7)),
    ...                        GroupPlan(Group("a", 2, 10, 20), ())), embedding_dim=8, tau=0.0)
    >>> rows = ServingRows(plan, ["a"])
    >>> rows.ids_of_ranks("a", np.array([0, 3, 4, 9, 10, 19])).tolist()  # the wider group first
    [6, 9, 0, 5, 10, 10]
    >>> kjt = rows(torch.tensor([[0, 5, 10]]))
    >>> kjt.keys(), kjt.values().tolist()   # slab a:0-4 stores ids 0-9, a:4-8 ids 0-5
    (['a:0-4', 'a:4-8'], [0, 5, 10, 0, 5, 6])
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from plans.structured import GroupPlan, StructuredPlan
from sharding.column_slabs import ColumnSlabs, Slab
from sharding.kjt import single_hot_kjt


class ServingRows(nn.Module):
    """Ids ``[F, B]`` of ``keys`` in serving numbering (``ids_of_ranks``) -> the slab KJT
    of the tables ``relay`` re-lays; see the module docstring.

    Raises:
        ValueError: from ``forward``, naming an id outside its feature's serving ids (not
            while exporting).
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str]) -> None:
        super().__init__()
        slabs = ColumnSlabs(plan, keys)
        self.keys, self.out_keys = list(keys), [s.name for s in slabs.slabs]
        ordered = {key: widest_first(plan, key) for key in self.keys}
        self.sources = {s.name: slab_sources(s, ordered[s.key]) for s in slabs.slabs}
        field = {key: i for i, key in enumerate(self.keys)}
        stored = {key: sum(g.stored_rows for g in groups) for key, groups in ordered.items()}
        # Per slab its feature and n_s (its zero row); per feature its highest id (the dropped groups').
        self.register_buffer("field", torch.tensor([field[s.key] for s in slabs.slabs]), persistent=False)
        self.register_buffer("limit", torch.tensor([[len(self.sources[s.name])] for s in slabs.slabs]),
                             persistent=False)
        self.register_buffer("top", torch.tensor([[stored[key]] for key in self.keys]), persistent=False)
        self.register_buffer("bottom", torch.zeros_like(self.top), persistent=False)  # clamp takes two tensors
        self._numbering = {key: numbering(plan, key, ordered[key], stored[key]) for key in self.keys}

    def ids_of_ranks(self, key: str, ranks: np.ndarray) -> np.ndarray:
        """Serving ids (int64) of ``key``'s frequency ranks ``ranks``: what a vocabulary
        that maps raw values to ranks maps them to instead."""
        starts, bases, moduli = self._numbering[key]
        ranks = np.asarray(ranks, dtype=np.int64)
        group = np.searchsorted(starts, ranks, side="right") - 1
        return bases[group] + (ranks - starts[group]) % moduli[group]

    def serving_ids(self, ranks: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """Serving ids of frequency ranks ``[len(keys), B]``, row ``i`` of feature ``keys[i]``."""
        return torch.from_numpy(np.stack([self.ids_of_ranks(key, ranks[i].numpy()) for i, key in enumerate(keys)]))

    def relay(self, ebc: EmbeddingBagCollection) -> EmbeddingBagCollection:
        """A copy of the slab tables ``ebc`` (``t_<slab>``, rows in training order) with
        each slab's rows in serving order and a zero row after them."""
        configs, weights = [], []
        for config in ebc.embedding_bag_configs():
            source = self.sources[config.feature_names[0]]
            weight = ebc.embedding_bags[config.name].weight.detach()
            weights.append(torch.cat([weight[source], weight.new_zeros(1, weight.shape[1])]))
            configs.append(dataclasses.replace(config, num_embeddings=weights[-1].shape[0]))
        relaid = EmbeddingBagCollection(configs, is_weighted=ebc.is_weighted(), device=torch.device("cpu"))
        with torch.no_grad():
            for config, weight in zip(configs, weights):
                relaid.embedding_bags[config.name].weight.copy_(weight)
        return relaid

    def forward(self, ids: torch.Tensor, weights: torch.Tensor | None = None, check: bool = True) -> KeyedJaggedTensor:
        """The slab KJT of serving ids ``[F, B]`` (``keys`` order) and their weights;
        ``check=False`` for ids known to be in range (a vocabulary's)."""
        field = self.field  # each buffer read costs 0.5 µs (nn.Module.__getattr__)
        # An exported graph has no data checks; clamp + equal: 2 small ops at batch 1, not 4.
        if check and not torch.compiler.is_compiling() and not torch.equal(ids.clamp(self.bottom, self.top), ids):
            bad = (ids > self.top) | (ids < 0)
            f = int(bad.any(dim=1).nonzero()[0])
            raise ValueError(f"id {int(ids[f][bad[f]][0])} of {self.keys[f]} is outside its serving ids "
                             f"0..{int(self.top[f])}")
        # In place: a fresh [S, B] output is a page-faulting allocation at 4096 rows (0.46 -> 0.35 ms).
        values = ids.index_select(0, field).clamp_max_(self.limit)
        return single_hot_kjt(self.out_keys, values, None if weights is None else weights.index_select(0, field))


def orthonormal_projections(embedding: nn.Module) -> None:
    """Re-base a repacked embedding's learned projections to orthonormal rows, in place,
    after ``ServingRows.relay``: the same outputs, and the FM's sum of squares becomes a
    plain norm when folded (``pipeline.models.folded``) instead of a Gram term per feature.

    Each feature's ``P = L Q`` (LQ: ``Q`` with orthonormal rows, ``L`` lower triangular);
    the stored columns become ``x L`` and the projection ``Q``, so ``(x L) Q = x P``. ``L``
    lower triangular keeps the nested widths: a row stored ``w`` columns wide has zeros
    past ``w``, and so has ``x L``. Re-laid slabs of a feature store prefixes of one
    numbering (its widest columns the fewest rows), so the feature's slabs side by side
    are one ``[rows, W]`` matrix whose missing entries are those zeros.

    Example:
        >>> from sharding.repack import RepackedEmbedding
        >>> from plans.structured import Group, GroupPlan, StructuredPlan
        >>> plan = StructuredPlan((GroupPlan(Group("a", 0, 0, 2), (0, 1), 1), GroupPlan(Group("a", 1, 2, 5), (0,), 1)), 4, 0.0)
        >>> module = RepackedEmbedding(plan, ["a"], "learned")
        >>> module.ebc = ServingRows(plan, ["a"]).relay(module.ebc)
        >>> orthonormal_projections(module)
        >>> p = module.projections["a"].detach()
        >>> torch.allclose(p @ p.T, torch.eye(2))
        True
    """
    bags = embedding.ebc.embedding_bags
    with torch.no_grad():
        for key, slabs in embedding.slabs.by_key.items():
            projection = embedding.projections[key]
            q, r = torch.linalg.qr(projection.double().T)  # P^T = Q' R, so P = R^T Q'^T
            weights = [bags[f"t_{slab.name}"].weight for slab in slabs]
            stacked = weights[0].new_zeros(weights[0].shape[0], projection.shape[0], dtype=torch.float64)
            for slab, weight in zip(slabs, weights):
                stacked[: weight.shape[0], slab.lo : slab.hi] = weight
            turned = stacked @ r.T
            for slab, weight in zip(slabs, weights):
                weight.copy_(turned[: weight.shape[0], slab.lo : slab.hi])
            projection.copy_(q.T)


def widest_first(plan: StructuredPlan, key: str) -> list[GroupPlan]:
    """``key``'s stored groups in serving order: widest first, then by id."""
    return sorted((g for g in plan.groups if g.group.key == key and g.width), key=lambda g: (-g.width, g.group.start))


def slab_sources(slab: Slab, groups: list[GroupPlan]) -> torch.Tensor:
    """Per serving row of ``slab``, its row in the training layout (``slab.groups`` stacked
    in id order): the first ``n_s`` of ``groups`` (widest first) are the slab's."""
    first = dict(zip(slab.groups, slab.first_rows()))
    return torch.cat([torch.arange(first[g], first[g] + g.stored_rows) for g in groups if g in first]
                     or [torch.zeros(0, dtype=torch.int64)])


def numbering(
    plan: StructuredPlan, key: str, groups: list[GroupPlan], stored: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of ``key`` in id order: ``(start, first serving id, modulus)``; a rank
    ``i`` of a group becomes ``base + (i - start) mod modulus`` (a dropped group's ids all
    ``stored``, past every stored row)."""
    base, offset = {}, 0
    for g in groups:
        base[g], offset = offset, offset + g.stored_rows
    everything = sorted((g for g in plan.groups if g.group.key == key), key=lambda g: g.group.start)
    return (
        np.array([g.group.start for g in everything], dtype=np.int64),
        np.array([base.get(g, stored) for g in everything], dtype=np.int64),
        np.array([g.stored_rows if g in base else 1 for g in everything], dtype=np.int64),
    )
