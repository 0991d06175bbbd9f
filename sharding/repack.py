"""The shipped model's embeddings: a nested plan's kept columns as column slabs
(``sharding.column_slabs``), one dense table each, all in one ``EmbeddingBagCollection``,
and a multi-size embedding (ME) projection back to the model's dimension ``K``.

``KeyRewriter`` (a batch transform, run by the loader before the pipeline) sends each
id of feature ``f`` to every slab its group stores values in (the slabs below the
group's width), as its row there; ids of dropped groups (width 0) leave the batch, so
they embed to zeros exactly as the structurally pruned α-model gives them. No per-id
lookup table is needed because groups are id ranges of frequency-ranked ids.
``SingleHotKeyRewriter`` does the same for single-hot batches given as tensors, in a
fixed number of vectorised steps with no sort. Serving numbers ids its own way and needs
none of this (``sharding.serving_rows``).

``RepackedEmbedding`` pools each slab; a feature's slabs side by side are its nested
columns ``order[:W]`` (``W`` its widest group), which the projection maps back to
``K``. With ``projection="selection"`` each stored column goes back to its model column
(one ``index_copy`` for all features; outputs equal the pruned α-model's); with
``"learned"`` (NIS-ME) each feature has a trainable ``W × K`` matrix initialised to that
selection, whose first ``w`` rows a group of width ``w`` uses (NIS's embedding blocks:
one projection per column block, shared by the vocabulary ranges that store it).

Example:
    >>> from sharding.kjt import single_hot_kjt
    >>> from plans.structured import Group, GroupPlan, StructuredPlan
    >>> plan = StructuredPlan((GroupPlan(Group("a", 0, 0, 3), (0, 2), 2),
    ...                        GroupPlan(Group("a", 1, 3, 5), ())), embedding_dim=4, tau=0.1)
    >>> kjt = KeyRewriter(plan, ["a"])(single_hot_kjt(["a"], torch.tensor([[1, 4]])))
    >>> kjt.keys(), kjt.lengths().tolist()   # row 1's id 4 is dropped
    (['a:0-2'], [1, 0])
"""

from __future__ import annotations

from itertools import accumulate
from typing import Sequence

import torch
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from plans.structured import GroupPlan, StructuredPlan
from sharding.column_gather import scatter_columns
from sharding.column_lift import ColumnLift, FieldColumns
from sharding.column_slabs import NO_FOLD, ColumnSlabs, GroupIndex, Slab, fold, fold_constants

PROJECTIONS = ("selection", "learned")
torch.fx.wrap("scatter_columns")  # a leaf when the train pipeline traces the model


def repacked_table_configs(slabs: ColumnSlabs, init_scale: float = 0.01) -> list[EmbeddingBagConfig]:
    """One table per slab, initialised from ``uniform(-init_scale, init_scale)`` like the
    full tables (what a plan trained from scratch starts from; a retrain from searched
    weights overwrites it)."""
    return [
        EmbeddingBagConfig(
            name=f"t_{slab.name}", num_embeddings=slab.rows, embedding_dim=slab.width,
            feature_names=[slab.name], weight_init_min=-init_scale, weight_init_max=init_scale,
        )
        for slab in slabs.slabs
    ]


def slot_entries(index: GroupIndex, slabs: ColumnSlabs) -> list[list[tuple[int, int]]]:
    """Per slot of ``index``: ``(slab, row of its group's first id there - that id)`` for
    every slab its group is stored in, in slab order (none for dropped groups and ends)."""
    entries: dict = {}
    for i, slab in enumerate(slabs.slabs):
        for g, first in zip(slab.groups, slab.first_rows()):
            entries.setdefault(g, []).append((i, first - g.group.start))
    return [entries.get(g, []) if g is not None else [] for g in index.slots]


class KeyRewriter:
    """Batch transform: each id of ``keys`` into the slabs of its group, as its row there.

    A single-hot batch in ``keys`` order (what the loader makes without multi-hot bags)
    goes through ``SingleHotKeyRewriter``: the same KJT at a fifth of the cost (per
    1024-row batch on the inference benchmark's plans, one thread: 2.7 → 0.5 ms threshold,
    3.9 → 0.75 ms value), and the loader's prefetch thread shares the cores with the
    ranks. Any other batch (multi-hot, weighted, any key order) takes ``rewrite_bags``:
    the ``GroupIndex`` lookup, one repeat per slab an id is stored in, then one stable
    sort by (slab, row of the batch). Ids of dropped groups leave the batch.
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str]) -> None:
        self.single_hot = SingleHotKeyRewriter(plan, keys)
        self.index = GroupIndex(plan, keys)
        slabs = ColumnSlabs(plan, keys)
        self.out_keys = [s.name for s in slabs.slabs]
        per_slot = slot_entries(self.index, slabs)
        self._count = torch.tensor([len(e) for e in per_slot], dtype=torch.int64)
        self._first = torch.cumsum(self._count, 0) - self._count
        self._slab = torch.tensor([i for e in per_slot for i, _ in e], dtype=torch.int64)
        self._shift = torch.tensor([shift for e in per_slot for _, shift in e], dtype=torch.int64)

    def __call__(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        lengths, fields = features.lengths(), len(self.index.keys)
        if features.keys() == self.index.keys and lengths.numel() == fields * features.stride() \
                and bool((lengths == 1).all()):
            weights = features.weights_or_none()
            # ``forward``, not ``__call__``: the loader runs this in its prefetch thread while
            # the train pipeline may be FX-tracing the model, and tracing patches every
            # module's ``__call__`` (a module call from this thread fails the trace).
            return self.single_hot.forward(features.values().long().view(fields, -1),
                                           None if weights is None else weights.view(fields, -1))
        return self.rewrite_bags(features)

    def rewrite_bags(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The slab KJT of any batch of ``keys`` (see the class docstring)."""
        batch = features.stride()
        found = self.index.locate(features)
        count = self._count[found.slot]
        which = torch.repeat_interleave(torch.arange(count.numel()), count)  # id of each output value
        entry = self._first[found.slot][which] + torch.arange(which.numel()) - (torch.cumsum(count, 0) - count)[which]
        order_key = self._slab[entry] * batch + found.segment[which] % batch
        order = torch.sort(order_key, stable=True).indices
        weights = features.weights_or_none()
        return KeyedJaggedTensor(
            keys=self.out_keys,
            values=(found.folded[which] + self._shift[entry])[order],
            lengths=torch.bincount(order_key, minlength=len(self.out_keys) * batch).to(features.lengths().dtype),
            weights=None if weights is None else weights[which][order],
            stride=batch,
        )


NOT_STORED = torch.iinfo(torch.int64).min  # marks (slab, segment) pairs whose ids the slab does not store
# From COMPARE_ROWS rows on, counting the bounds at or below each id (one compare per
# bound, no branch) finds the ids' segments faster than a binary search per id, whose
# branches frequency-ranked ids mispredict: 0.7 against 1.3 ms at 4096 rows of the
# benchmark's CR-10 plan (39 features, 13 bounds each), slower below 128 rows. The
# compares grow with the bounds per feature, the search with their log: about even at 32.
COMPARE_ROWS, COMPARE_BOUNDS = 128, 32


def segments(
    index: GroupIndex, entries: list[list[tuple[int, int]]], key: str
) -> list[tuple[GroupPlan, list[tuple[int, int]]]]:
    """Feature ``key``'s groups merged into segments, each as its first group and its
    ``slot_entries``: consecutive groups merge when every slab stores both at the same
    shift (row - id), or neither, and neither shares rows. A slab stores its feature's
    ids as a few runs of consecutive rows (a group of shared rows is a run of its own);
    the segment starts are where any of them starts or ends, a few per feature in nested
    plans, however many groups."""
    out: list[tuple[GroupPlan, list[tuple[int, int]]]] = []
    for slot in index.key_slots[key][:-1]:
        g = index.slots[slot]
        if not (out and g.buckets is None and out[-1][0].buckets is None and out[-1][1] == entries[slot]):
            out.append((g, entries[slot]))
    return out


class SingleHotKeyRewriter(nn.Module):
    """``KeyRewriter`` of single-hot batches from tensors: ids ``[F, B]`` of ``keys`` (and
    their weights) -> the slab KJT, with no sort and no per-key work.

    Every id's position among its own feature's segment starts (``segments``) gives its
    segment: one ``searchsorted``, or from ``COMPARE_ROWS`` rows on the count of starts at
    or below it, one compare per start. A slab's bags are its feature's ``B`` rows in
    order, so every slab takes its feature's whole row of ids (``[S, B]``), adds each
    id's shift into the slab (one gather from a ``[S, segments]`` table) and keeps the
    ids it stores (with weights, one ``nonzero`` for both). Ids are checked against the plan.
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str]) -> None:
        super().__init__()
        index, slabs = GroupIndex(plan, keys), ColumnSlabs(plan, keys)
        self.out_keys = [s.name for s in slabs.slabs]
        entries = slot_entries(index, slabs)
        merged = {key: segments(index, entries, key) for key in keys}
        # Row f: feature f's segment starts, then its stop, padded. An id's position there
        # (searchsorted, right) is 0 below the first segment, j in the j-th segment, and
        # segments + 1 at or past the stop.
        positions = 2 + max(len(m) for m in merged.values())
        bounds = torch.full((len(keys), positions - 1), torch.iinfo(torch.int64).max)
        known = torch.zeros(len(keys), positions, dtype=torch.bool)
        # code[s, position]: the shift of an id at that position into slab s, or NOT_STORED;
        # per (feature, position): fold's start and modulus (groups of shared rows only).
        code = torch.full((len(slabs.slabs), positions), NOT_STORED)
        fold_start = torch.zeros(len(keys), positions, dtype=torch.int64)
        fold_modulus = torch.full((len(keys), positions), NO_FOLD)
        for f, key in enumerate(keys):
            firsts = [g for g, _ in merged[key]]
            bounds[f, : len(firsts) + 1] = torch.tensor([g.group.start for g in firsts] + [int(index.stops[f])])
            known[f, 1 : len(firsts) + 1] = True
            fold_start[f, 1 : len(firsts) + 1], fold_modulus[f, 1 : len(firsts) + 1] = fold_constants(firsts)
            for j, (_, shifts) in enumerate(merged[key], start=1):
                for i, shift in shifts:
                    code[i, j] = shift
        self.folds = index.folds
        field = {key: i for i, key in enumerate(keys)}
        self.register_buffer("fold_start", fold_start, persistent=False)
        self.register_buffer("fold_modulus", fold_modulus, persistent=False)
        self.register_buffer("bounds", bounds, persistent=False)
        self.register_buffer("known", known, persistent=False)
        self.register_buffer("code", code, persistent=False)
        self.register_buffer("field", torch.tensor([field[s.key] for s in slabs.slabs]), persistent=False)

    def forward(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> KeyedJaggedTensor:
        """The slab KJT of ids ``[F, B]`` (frequency ranks, ``keys`` order) and weights.

        Raises:
            ValueError: naming an id outside its feature's groups.
        """
        bounds, field = self.bounds, self.field  # each buffer read costs 0.5 µs (nn.Module.__getattr__)
        if ids.shape[1] < COMPARE_ROWS or bounds.shape[1] > COMPARE_BOUNDS:
            position = torch.searchsorted(bounds, ids, right=True)  # [F, B]
        else:
            position = (ids >= bounds.t().unsqueeze(2)).view(torch.uint8).sum(0, dtype=torch.uint8).long()
        known = torch.gather(self.known, 1, position)
        if not bool(known.all()):
            raise ValueError(f"id {int(ids[~known][0])} is outside the ranges of the prune plan's groups")
        if self.folds:
            ids = fold(ids, torch.gather(self.fold_start, 1, position), torch.gather(self.fold_modulus, 1, position))
        code = torch.gather(self.code, 1, position.index_select(0, field))  # [S, B]
        stored = code != NOT_STORED
        lengths = stored.view(-1)
        values = ids.index_select(0, field).add_(code)
        if weights is None:
            values = values.masked_select(stored)
        else:  # one nonzero for both: each masked_select scans the mask again
            kept = lengths.nonzero().view(-1)
            values = values.view(-1).index_select(0, kept)
            weights = weights.index_select(0, field).view(-1).index_select(0, kept)
        return KeyedJaggedTensor(
            keys=self.out_keys, values=values, lengths=lengths.to(torch.int32), weights=weights, stride=ids.shape[1]
        )


# The planner would replicate the many small tables (data parallel): their dense
# gradients then cost a copy and an all-reduce of every table each step (5x slower
# retraining with 521 per-group tables). Sharded kinds train them sparsely in the fused
# kernel.
SHARDED_KINDS = ("table_wise", "column_wise", "table_column_wise")


def repacked_constraints(module: "RepackedEmbedding") -> dict[str, ParameterConstraints]:
    """Planner constraints for the repacked tables: any sharded kind, never replicated."""
    return {
        c.name: ParameterConstraints(sharding_types=list(SHARDED_KINDS))
        for c in module.ebc.embedding_bag_configs()
    }


class RepackedEmbedding(nn.Module):
    """Slab tables + ME projection: ``[B, F, K]`` in ``keys`` order, like the α-EBC.

    Args:
        plan: the nested structured prune plan (kept columns per group).
        keys: the model's feature keys, in field order.
        projection: ``selection`` (fixed, exact) or ``learned`` (NIS-ME).
        weighted: whether features carry weights (the paper's dense fields).
        device: where the tables go (``meta`` before sharding).
        init_scale: tables start from ``uniform(-init_scale, init_scale)``.

    Raises:
        ValueError: for an unknown projection, a plan that is not nested or keeps nothing.
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
        self.slabs = ColumnSlabs(plan, keys)
        if not self.slabs.slabs:
            raise ValueError("the plan keeps no column of any group: nothing to repack")
        self.ebc = EmbeddingBagCollection(
            repacked_table_configs(self.slabs, init_scale), is_weighted=weighted, device=device
        )
        self.learned = projection == "learned"
        self.projections = nn.ParameterDict()
        if self.learned:  # per feature, row i puts stored column i at its model column
            for key, columns in self.slabs.features.items():
                self.projections[key] = nn.Parameter(projection_init(columns.order, self.embedding_dim))
        # The pooled columns, slab by slab (table order): each one's place in the flattened
        # [F, K] output (a selection's; its field is place // K), each slab's range of them,
        # and which columns each field reads (``FieldColumns``: the fold's layout).
        field = {key: i for i, key in enumerate(self.keys)}
        places = [field[s.key] * self.embedding_dim + c for s in self.slabs.slabs for c in s.columns]
        self.register_buffer("_places", torch.tensor(places, dtype=torch.int64), persistent=False)
        starts = [0, *accumulate(s.width for s in self.slabs.slabs)]
        self._column_range = {s.name: (a, b) for s, a, b in zip(self.slabs.slabs, starts, starts[1:])}
        self.columns = starts[-1]
        self.register_buffer("_columns", torch.arange(self.columns), persistent=False)
        fields = FieldColumns.of(self._places, len(self.keys), self.embedding_dim)
        self.register_buffer("_slots", fields.slots, persistent=False)
        self.register_buffer("_positions", fields.positions, persistent=False)
        self._widths = fields.widths

    @property
    def num_fields(self) -> int:
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(features)
        if self.learned:
            # Pooled slabs by name (views of one split: its backward is one cat). Slicing
            # one wide tensor instead makes every slice's backward zero-fill its width.
            by_name = pooled.to_dict()
            return torch.stack([self._learned(key, by_name) for key in self.keys], dim=1)
        width = self.num_fields * self.embedding_dim
        out = scatter_columns(pooled, self._places, self._column_range, width)
        return out.view(-1, self.num_fields, self.embedding_dim)

    def pooled_columns(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, C]``: the pooled slab columns in table order (whatever order of keys a
        sharded EBC gives them in): what ``output_map`` maps to the fields."""
        return scatter_columns(self.ebc(features), self._columns, self._column_range, self.columns)

    def column_lift(self) -> ColumnLift:
        """How ``pooled_columns`` make the fields, from the live projections (autograd
        reaches them through it)."""
        rows = torch.cat([self.projections[s.key][s.lo : s.hi] for s in self.slabs.slabs]) if self.learned else None
        fields = FieldColumns(self._slots, self._positions, self._widths)
        return ColumnLift(self.num_fields, self.embedding_dim, self._places, fields, rows)

    def output_map(self) -> torch.Tensor:
        """``[C, F * K]``: the output as a linear map of the pooled slab columns (slabs in
        table order), ``forward(f) == (ebc(f).values() @ output_map()).view(-1, F, K)``.
        A selected column has a 1 at its place; a learned one its feature's projection row."""
        out = torch.zeros(sum(s.width for s in self.slabs.slabs), self.num_fields * self.embedding_dim)
        field, start = {key: i for i, key in enumerate(self.keys)}, 0
        for s in self.slabs.slabs:
            rows, place = slice(start, start + s.width), field[s.key] * self.embedding_dim
            if self.learned:
                out[rows, place : place + self.embedding_dim] = self.projections[s.key].detach()[s.lo : s.hi]
            else:
                out[torch.arange(start, start + s.width), place + torch.tensor(s.columns)] = 1.0
            start += s.width
        return out

    def _learned(self, key: str, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, K]``: the feature's slabs side by side times its projection (zeros when
        the plan keeps nothing of it)."""
        slabs = self.slabs.by_key.get(key)
        if not slabs:  # shaped like a pooled slab, by name (the pipeline traces this)
            first = pooled[self.slabs.slabs[0].name]
            return first.new_zeros(first.shape[0], self.embedding_dim)
        return torch.cat([pooled[s.name] for s in slabs], dim=1) @ self.projections[key]


def projection_init(order: Sequence[int], embedding_dim: int, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """``[len(order), K]``: a learned projection that maps stored column ``i`` back as
    its model column ``order[i]`` (row ``i`` one-hot), or with ``rotation`` (``R``, the
    stored columns being those of ``E R``) as ``R[:, order[i]]ᵀ``, undoing the turn.

    Example:
        >>> projection_init([2, 0], 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    basis = torch.eye(embedding_dim) if rotation is None else rotation.float()
    # Rows of the transpose by index: a fresh [W, K] tensor with strides (K, 1). (A
    # transposed [1, K] slice counts as contiguous at strides (1, 1), and DDP then warns
    # on every step that its gradient's strides do not match.)
    return basis.T[list(order)]


def repacked_weights(
    plan: StructuredPlan, keys: Sequence[str], tables: dict[str, torch.Tensor], alpha: torch.Tensor,
    rotations: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Table weights of ``RepackedEmbedding.ebc`` from the searched full-width tables.

    ``tables[key]`` is the key's ``[rows, K]`` table (whole, or the rows of the groups
    this process builds); α is folded into the values: ``E[id, cols] * α[block, cols]``
    for each slab's columns, its groups' rows stacked. With ``rotations`` (per feature
    ``R``, ``pipeline.prune.basis``) the columns are those of ``(E[id] * α[block]) R``.
    """
    rotations = rotations or {}
    return {f"t_{slab.name}": slab_values(slab, tables[slab.key], alpha, rotations.get(slab.key))
            for slab in ColumnSlabs(plan, keys).slabs}


def rotated_projections(plan: StructuredPlan, keys: Sequence[str], rotations: dict[str, torch.Tensor]) -> dict:
    """Per feature the learned projection that starts a ``repacked_weights`` of
    ``rotations``: the stored principal coordinates back through their eigenvectors."""
    return {key: projection_init(columns.order, plan.embedding_dim, rotations[key])
            for key, columns in ColumnSlabs(plan, keys).features.items()}


def slab_values(slab: Slab, table: torch.Tensor, alpha: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """``[slab.rows, slab.width]``: the slab's columns of its groups' rows of ``table``,
    α-scaled (and turned by ``rotation``); a shared row starts as the mean of the rows
    of the ids it serves."""
    cols = torch.tensor(slab.columns, dtype=torch.int64)

    def columns(g: GroupPlan) -> torch.Tensor:
        rows = table[g.group.start : g.group.stop]
        if rotation is None:
            return rows[:, cols] * alpha[g.group.block, cols]
        return ((rows * alpha[g.group.block]) @ rotation.to(rows.dtype))[:, cols]

    return torch.cat([shared_mean(g, columns(g)) for g in slab.groups])


def shared_mean(group: GroupPlan, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` of ``group``'s ids, or for a group of shared rows each row's mean over
    the ids ``fold`` sends to it.

    Example:
        >>> from plans.structured import Group
        >>> shared_mean(GroupPlan(Group("a", 0, 0, 3), (0,), 1, buckets=2), torch.tensor([[1.0], [2.0], [5.0]]))
        tensor([[3.],
                [2.]])
    """
    if group.buckets is None:
        return rows
    bucket = torch.arange(rows.shape[0]) % group.buckets
    sums = rows.new_zeros(group.buckets, rows.shape[1]).index_add_(0, bucket, rows)
    return sums / torch.bincount(bucket, minlength=group.buckets).unsqueeze(1).to(rows.dtype)


def load_repacked_weights(module: RepackedEmbedding, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``repacked_weights`` into an unsharded ``RepackedEmbedding``."""
    bags = module.ebc.embedding_bags
    for name, values in weights.items():
        with torch.no_grad():
            bags[name].weight.copy_(values)
