"""Serving form of the repacked embeddings: every kept group's rows in one table per
width, looked up straight from the original feature ids, with no slab keys.

A ``RepackedEmbedding`` spreads a group's row over the column slabs below its width,
each a pooled key of its own. ``FusedLookup`` joins each group's row back (its nested
columns, ``order[:width]``), finds each id's group with one ``searchsorted``
(``column_slabs.GroupIndex``, shared with the training-time key rewrite), reads its row
from the table of the group's width, spreads it to its columns and adds it to its
(row, field) cell of ``[B, F, K]``: work in proportion to the ids, a few vectorised
passes per width. Outputs equal the repacked module's with the selection projection, for
single- and multi-hot, weighted or not (sum pooling).

Example:
    >>> fused = FusedLookup.from_repacked(repacked_embedding, plan)   # doctest: +SKIP
    >>> fused(original_kjt)   # the un-rewritten batch, [B, F, K]       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.prune.plan import StructuredPlan
from sharding.column_slabs import ColumnSlabs, GroupIndex
from sharding.repack import RepackedEmbedding


class FusedLookup(nn.Module):
    """``[B, F, K]`` embeddings of un-rewritten features from per-width tables.

    Args:
        plan: the nested structured plan the tables follow.
        keys: feature keys in field order.
        tables: per slab name (``a:0-4``), its ``[rows, width]`` weights.
    """

    def __init__(self, plan: StructuredPlan, keys: Sequence[str], tables: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.keys = list(keys)
        self.embedding_dim = plan.embedding_dim
        self.index = GroupIndex(plan, keys)
        slabs = ColumnSlabs(plan, keys)
        pieces_of: dict = {}  # group -> its row's pieces, slab by slab
        for slab in slabs.slabs:
            for g, first in zip(slab.groups, slab.first_rows()):
                pieces_of.setdefault(g, []).append(tables[slab.name][first : first + g.group.rows])
        self.widths = sorted({s.hi for s in slabs.slabs})
        pieces: dict[int, list[torch.Tensor]] = {w: [] for w in self.widths}
        columns: dict[int, list[tuple[int, ...]]] = {w: [] for w in self.widths}
        width_of, first_row, index_in_width = [], [], []
        for g in self.index.slots:  # in id order, so each width's table is too
            if g is None or g.width == 0:  # past a feature's ids, or dropped
                width_of.append(-1 if g is None else 0)
                first_row.append(0)
                index_in_width.append(0)
                continue
            width_of.append(g.width)
            first_row.append(sum(p.shape[0] for p in pieces[g.width]) - g.group.start)
            index_in_width.append(len(columns[g.width]))
            pieces[g.width].append(torch.cat(pieces_of[g], dim=1))
            columns[g.width].append(slabs.features[g.group.key].order[: g.width])
        self.register_buffer("width_of", torch.tensor(width_of, dtype=torch.int64))
        self.register_buffer("first_row", torch.tensor(first_row, dtype=torch.int64))
        self.register_buffer("index_in_width", torch.tensor(index_in_width, dtype=torch.int64))
        self.tables = nn.ParameterDict({
            str(w): nn.Parameter(torch.cat(pieces[w]), requires_grad=False) for w in self.widths
        })
        for w in self.widths:
            self.register_buffer(f"columns_{w}", torch.tensor(columns[w], dtype=torch.int64))

    @classmethod
    def from_repacked(cls, module: RepackedEmbedding, plan: StructuredPlan) -> "FusedLookup":
        """The same tables as ``module`` (selection projection), fused by width."""
        if module.learned:
            raise ValueError("FusedLookup reproduces the selection projection only")
        bags = module.ebc.embedding_bags
        tables = {name[2:]: bag.weight.detach() for name, bag in bags.items()}  # "t_a:0-4" -> "a:0-4"
        return cls(plan, module.keys, tables)

    @property
    def num_fields(self) -> int:
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        batch, fields, k = features.stride(), len(self.keys), self.embedding_dim
        found = self.index.locate(features)
        # Ids sorted by width, so each width's ids are one slice; per width each id's row
        # is spread to its K columns and added to its (row, field) cell.
        width, order = torch.sort(self.width_of[found.slot])
        bounds = torch.searchsorted(width, torch.tensor([[w, w + 1] for w in self.widths])).tolist()
        slot = found.slot[order]
        row = self.first_row[slot] + found.ids[order]
        local = self.index_in_width[slot]
        cell = ((found.segment % batch) * fields + found.field)[order]
        weights = features.weights_or_none()
        weights = None if weights is None else weights[order, None]
        out = torch.zeros(batch * fields, k, dtype=self.tables[str(self.widths[0])].dtype)
        for w, (lo, hi) in zip(self.widths, bounds):  # width 0 (dropped groups) is skipped
            values = self.tables[str(w)][row[lo:hi]]
            if weights is not None:
                values = values * weights[lo:hi]
            columns = getattr(self, f"columns_{w}")[local[lo:hi]]
            out.index_add_(0, cell[lo:hi], values.new_zeros(hi - lo, k).scatter_add_(1, columns, values))
        return out.view(batch, fields, k)
