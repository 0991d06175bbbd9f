"""DLRM (Naumov et al. 2019): pairwise dot interactions, then a top MLP."""

from __future__ import annotations

import torch

from pipeline.models.base import CTRModel, mlp_head


class DLRM(CTRModel):
    """Top MLP over ``[dense field, <v_i, v_j> for i < j]``.

    With ``dense_mode=mlp`` the bottom MLP's output is the dense field (as in TorchRec's
    DLRM); otherwise the dense values are features in the KJT and only the dots remain.
    """

    def __init__(self, embedding, num_fields, num_dense, cfg):
        super().__init__(embedding, num_fields, num_dense, cfg)
        n = self.num_fields
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        dense_width = cfg.embedding_dim if self.dense_arch is not None else 0
        self.top = mlp_head(dense_width + rows.numel(), cfg.mlp_dims)

    def interact(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        fields = self.fields(dense, embeddings)
        dots = torch.bmm(fields, fields.transpose(1, 2))[:, self.pair_rows, self.pair_cols]
        if self.dense_arch is not None:
            dots = torch.cat([fields[:, 0], dots], dim=1)
        return self.top(dots).squeeze(1)
