"""DeepFM (Guo et al. 2017): an FM and an MLP sharing the field embeddings."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pipeline.models.base import CTRModel, fm_pairwise, mlp_head
from pipeline.models.folded import FoldedInteraction, folded_interaction


class DeepFM(CTRModel):
    """``bias + <w, flat(fields)> + Σ_{i<j} <v_i, v_j> + deep(flat(fields))``."""

    def __init__(self, embedding, num_fields, num_dense, cfg):
        super().__init__(embedding, num_fields, num_dense, cfg)
        self.first_order = nn.Linear(self.flat_dim, 1)
        self.deep = mlp_head(self.flat_dim, cfg.mlp_dims)

    def interact(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        fields = self.fields(dense, embeddings)
        flat = fields.flatten(1)
        return (self.first_order(flat) + self.deep(flat)).squeeze(1) + fm_pairwise(fields)

    def folded(self, output_map: torch.Tensor) -> Optional[FoldedInteraction]:
        heads = [self.first_order, self.deep]
        return folded_interaction(self.dense_arch, heads, self.lift(output_map), self.embedding_dim, fm=True)
