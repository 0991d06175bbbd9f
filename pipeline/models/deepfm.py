"""DeepFM (Guo et al. 2017): an FM and an MLP sharing the field embeddings."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import CTRModel, fm_pairwise, mlp_head


class DeepFM(CTRModel):
    """``bias + <w, flat(fields)> + Σ_{i<j} <v_i, v_j> + deep(flat(fields))``."""

    folded_heads = ("first_order", "deep")
    folded_fm = True

    def __init__(self, embedding, num_fields, num_dense, cfg):
        super().__init__(embedding, num_fields, num_dense, cfg)
        self.first_order = nn.Linear(self.flat_dim, 1)
        self.deep = mlp_head(self.flat_dim, cfg.mlp_dims)

    def interact(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        fields = self.fields(dense, embeddings)
        flat = fields.flatten(1)
        return (self.first_order(flat) + self.deep(flat)).squeeze(1) + fm_pairwise(fields)
