"""Wide & Deep (Cheng et al. 2016) over field embeddings."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import CTRModel, mlp_head


class WideDeep(CTRModel):
    """``wide(flat(fields)) + deep(flat(fields))``: a linear model beside an MLP.

    The wide part is linear in the field embeddings (no separate per-id scalar tables).
    """

    folded_heads = ("wide", "deep")
    folded_fm = False

    def __init__(self, embedding, num_fields, num_dense, cfg):
        super().__init__(embedding, num_fields, num_dense, cfg)
        self.wide = nn.Linear(self.flat_dim, 1)
        self.deep = mlp_head(self.flat_dim, cfg.mlp_dims)

    def interact(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        flat = self.fields(dense, embeddings).flatten(1)
        return (self.wide(flat) + self.deep(flat)).squeeze(1)
