"""DCN-V2 (Wang et al. 2021), stacked: cross network, then an MLP."""

from __future__ import annotations

import torch
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet

from pipeline.models.base import CTRModel, mlp_head


class DCNv2(CTRModel):
    """``deep(cross(flat(fields)))`` with TorchRec's (low-rank) cross network."""

    def __init__(self, embedding, num_fields, num_dense, cfg):
        super().__init__(embedding, num_fields, num_dense, cfg)
        if cfg.cross_rank > 0:
            self.cross = LowRankCrossNet(self.flat_dim, cfg.cross_layers, cfg.cross_rank)
        else:
            self.cross = CrossNet(self.flat_dim, cfg.cross_layers)
        self.deep = mlp_head(self.flat_dim, cfg.mlp_dims)

    def interact(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        flat = self.fields(dense, embeddings).flatten(1)
        return self.deep(self.cross(flat)).squeeze(1)
