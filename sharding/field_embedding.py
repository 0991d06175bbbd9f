"""A plain EBC read as ``[B, F, K]`` fields: the reference (unsearched) embedding module."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


def block_key(key: str, block: int) -> str:
    """KJT key of block ``block`` of the multi-hot feature ``key`` (see ``split_multi_hot``)."""
    return f"{key}@{block}"


def table_name(key: str) -> str:
    """Name of the embedding table of feature ``key``."""
    return f"t_{key}"


def table_configs(
    num_embeddings: dict[str, int],
    embedding_dim: int,
    init_scale: float,
    multi_hot: Sequence[str] = (),
    num_blocks: int = 1,
) -> list[EmbeddingBagConfig]:
    """One table per feature, single-hot tables first, all from ``uniform(-s, s)``.

    TorchRec's default init scales by ``1/sqrt(num_embeddings)``; one global pruning
    threshold would then cut big tables and spare small ones whatever α says, so every
    table gets the same range here. A multi-hot feature's table serves its per-block
    keys ``f@0 .. f@{L-1}``.
    """
    order = [k for k in num_embeddings if k not in multi_hot] + list(multi_hot)
    return [
        EmbeddingBagConfig(
            name=table_name(key),
            num_embeddings=num_embeddings[key],
            embedding_dim=embedding_dim,
            feature_names=(
                [block_key(key, b) for b in range(num_blocks)] if key in multi_hot else [key]
            ),
            weight_init_min=-init_scale,
            weight_init_max=init_scale,
        )
        for key in order
    ]


def pooled_by_name(pooled: KeyedTensor, names: Sequence[str]) -> torch.Tensor:
    """Columns of ``pooled`` in the order of ``names``, as one ``[B, sum(dims)]`` tensor.

    A sharded EBC orders its output keys by shard, so they are read by name (as DLRM's
    ``SparseArch`` does) rather than trusting the column order of ``.values()``; keys
    already in that order (an unsharded EBC's) are returned as they are, without a copy
    (not while the train pipeline traces: a traced proxy's keys are unknown).
    """
    if isinstance(pooled, KeyedTensor) and pooled.keys() == list(names):
        return pooled.values()
    return KeyedTensor.regroup([pooled], [list(names)])[0]


class FieldEmbeddingCollection(nn.Module):
    """``[B, F, K]`` pooled embeddings of a plain EBC, one field per feature key.

    Args:
        ebc: an EBC whose tables all have dimension ``K``, one feature per table.
        keys: field order of the output.
    """

    def __init__(self, ebc: EmbeddingBagCollection, keys: Sequence[str]) -> None:
        super().__init__()
        self.ebc = ebc
        self.keys = list(keys)
        dims = {c.embedding_dim for c in ebc.embedding_bag_configs()}
        if len(dims) != 1:
            raise ValueError(f"all tables need one dimension K, got {sorted(dims)}")
        self.embedding_dim = dims.pop()

    @property
    def num_fields(self) -> int:
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = pooled_by_name(self.ebc(features), self.keys)
        return pooled.reshape(-1, len(self.keys), self.embedding_dim)
