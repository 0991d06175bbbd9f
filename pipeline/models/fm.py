"""Factorization Machine (Rendle 2010) over field embeddings."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import CTRModel, fm_pairwise


class FM(CTRModel):
    """``bias + <w, flat(fields)> + Σ_{i<j} <v_i, v_j>``.

    The first-order weight of an id is ``<w_field, e_id>``: it lives in the id's own
    embedding, so every per-id byte is in the searched (and pruned) tables.
    """

    folded_heads = ("first_order",)
    folded_fm = True

    def __init__(self, embedding, num_fields, num_dense, cfg):
        super().__init__(embedding, num_fields, num_dense, cfg)
        self.first_order = nn.Linear(self.flat_dim, 1)

    def interact(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        fields = self.fields(dense, embeddings)
        return self.first_order(fields.flatten(1)).squeeze(1) + fm_pairwise(fields)
