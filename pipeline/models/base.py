"""What every CTR model shares: an embedding module in, a logit per row out.

A model takes its embedding module as an argument (a plain EBC adapter, the α-EBC, or
later the repacked multi-size module): anything mapping a ``KeyedJaggedTensor`` to
``[B, F, K]``. ``forward(dense, sparse) == interact(dense, embedding(sparse))``; the
split lets the DNIS step run the interaction on α-scaled embeddings it built itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import ModelConfig
from pipeline.models.column_fold import column_fold_logits
from pipeline.models.folded import FoldedInteraction, folded_interaction
from sharding.squared_norm import squared_norm

torch.fx.wrap("squared_norm")  # a leaf when the train pipeline traces the model


def mlp_head(in_features: int, dims: tuple[int, ...]) -> nn.Sequential:
    """ReLU MLP of ``dims`` followed by a linear layer to one logit, as one flat
    ``Sequential`` that starts with its first linear layer (a repacked model trains it
    folded: ``pipeline.models.column_fold``)."""
    layers: list[nn.Module] = []
    for width in dims:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, 1))


def fm_pairwise(fields: torch.Tensor) -> torch.Tensor:
    """FM second-order term ``Σ_{i<j} <v_i, v_j>`` of ``[B, F, K]`` fields, shaped ``[B]``.

    ``Σ|v_i|²`` is a norm (``sharding.squared_norm``): it reads the fields once, where
    ``fields.pow(2)`` writes a squared copy first (0.74 against 2.4 ms at 4096 × 39 × 32,
    one thread), and its backward reads them once too. Its gradient at zero fields is 0."""
    square_of_sum = fields.sum(dim=1).square().sum(dim=1)
    sum_of_squares = squared_norm(fields, (1, 2))
    return 0.5 * (square_of_sum - sum_of_squares)


class CTRModel(nn.Module):
    """Base: builds the optional dense bottom MLP and the field tensor.

    Args:
        embedding: module mapping a KJT to ``[B, num_fields, embedding_dim]``.
        num_fields: fields the embedding module outputs.
        num_dense: dense inputs sent through a bottom MLP to one more K-dim field
            (``dense_mode=mlp``, as DLRM); 0 when dense values travel in the KJT.
        cfg: sizes of the interaction layers.
    """

    def __init__(self, embedding: nn.Module, num_fields: int, num_dense: int, cfg: ModelConfig):
        super().__init__()
        self.embedding = embedding
        self.embedding_dim = cfg.embedding_dim
        self.dense_arch = (
            MLP(num_dense, list(cfg.bottom_mlp_dims) + [cfg.embedding_dim]) if num_dense else None
        )
        self.num_fields = num_fields + (1 if num_dense else 0)
        self.flat_dim = self.num_fields * cfg.embedding_dim
        # A repacked embedding whose pooled columns are fewer than the fields' trains the
        # heads folded onto them (``pipeline.models.column_fold``).
        self.column_fold = bool(self.folded_heads) and hasattr(embedding, "pooled_columns") \
            and embedding.columns < num_fields * cfg.embedding_dim

    def fields(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, F', K]``: the dense field (if any) first, then the embeddings."""
        if self.dense_arch is None:
            return embeddings
        return torch.cat([self.dense_arch(dense).unsqueeze(1), embeddings], dim=1)

    def interact(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` from dense inputs and ``[B, F, K]`` embeddings."""
        raise NotImplementedError

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if self.column_fold:
            lift = self.embedding.column_lift()
            return column_fold_logits(self, dense, self.embedding.pooled_columns(sparse), lift)
        return self.interact(dense, self.embedding(sparse))

    # The heads that read ``flat(fields)`` through a linear layer first, and whether the FM
    # term is added: a model that names them can be served folded (``pipeline.models.folded``).
    folded_heads: tuple[str, ...] = ()
    folded_fm = False

    def folded(self, output_map: torch.Tensor) -> Optional[FoldedInteraction]:
        """The interaction read from pooled columns whose fields are ``pooled @ output_map``
        (``[C, F * K]``; ``pipeline.models.folded``), or ``None`` where it cannot be folded
        or folding would not pay."""
        if not self.folded_heads:
            return None
        heads = [getattr(self, name) for name in self.folded_heads]
        return folded_interaction(self.dense_arch, heads, self.lift(output_map), self.embedding_dim, self.folded_fm)

    def lift(self, output_map: torch.Tensor) -> torch.Tensor:
        """``[dense field, pooled] -> flat(fields)`` (the dense field, if any, passes as it is)."""
        if self.dense_arch is None:
            return output_map
        return torch.block_diag(torch.eye(self.embedding_dim), output_map)
