"""QR compositional embeddings (Shi et al., KDD 2020) as plain TorchRec tables.

Each QR feature ``f`` (see ``plans.qr.QRPlan``) becomes two keys, ``f@q``
(``id // m``) and ``f@r`` (``id % m``), each with its own table in one
``EmbeddingBagCollection`` that DMP shards with TorchRec's own sharders.
``QRKeyWriter`` (a batch transform, run by the loader before the pipeline) writes the
two keys; ``QREmbedding`` (a small module around the EBC, as DLRM's ``SparseArch``)
multiplies their pooled rows. The product of two pooled *sums* is the QR embedding only
for bags of at most one id, so QR features must be single-hot (every Criteo categorical
is; the paper's weighted dense fields have one-row tables and never become QR).

Example:
    >>> from sharding.kjt import single_hot_kjt
    >>> plan = QRPlan({"a": 10}, embedding_dim=4, remainders={"a": 4})
    >>> kjt = QRKeyWriter(plan)(single_hot_kjt(["a"], torch.tensor([[9, 2]])))
    >>> kjt.keys(), kjt.values().tolist()   # 9 = 2·4 + 1, 2 = 0·4 + 2
    (['a@q', 'a@r'], [2, 0, 1, 2])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from plans.qr import QRPlan
from sharding.field_embedding import table_configs, table_name


def qr_keys(key: str) -> tuple[str, str]:
    """KJT keys of the quotient and remainder ids of QR feature ``key``."""
    return f"{key}@q", f"{key}@r"


def qr_table_configs(plan: QRPlan, init_scale: float) -> list[EmbeddingBagConfig]:
    """The full tables of the plan's other features, then two tables per QR feature.

    Full and remainder tables start from the project's ``uniform(-s, s)``; quotient
    tables from ``uniform(1 - s, 1 + s)``, so a QR embedding starts at the same scale as
    a full row (a product of two ``uniform(-s, s)`` would be ``s²`` small, and the
    interaction layers would see near-zero inputs). The quotient factor then acts as a
    learned per-bucket rescaling of the remainder row; its noise only breaks ties.
    """
    full = {k: n for k, n in plan.num_embeddings.items() if k not in plan.remainders}
    configs = table_configs(full, plan.embedding_dim, init_scale)
    for key, m in plan.remainders.items():
        quotient_key, remainder_key = qr_keys(key)
        rows = {quotient_key: plan.table_rows(key) - m, remainder_key: m}
        ranges = {quotient_key: (1.0 - init_scale, 1.0 + init_scale), remainder_key: (-init_scale, init_scale)}
        configs += [
            EmbeddingBagConfig(
                name=table_name(k), num_embeddings=rows[k], embedding_dim=plan.embedding_dim,
                feature_names=[k], weight_init_min=ranges[k][0], weight_init_max=ranges[k][1],
            )
            for k in (quotient_key, remainder_key)
        ]
    return configs


class QRKeyWriter:
    """Batch transform: each QR feature's ids into its quotient and remainder keys.

    Other keys pass unchanged. Per-sample weights go to the quotient key only (the
    remainder key gets ones), so the product carries each weight once.

    Raises:
        ValueError: a QR feature has a bag of more than one id.
    """

    def __init__(self, plan: QRPlan) -> None:
        self.remainders = dict(plan.remainders)

    def __call__(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        batch = features.stride()
        per_key = features.length_per_key()
        values = features.values().split(per_key)
        lengths = features.lengths().view(-1, batch)
        weighted = features.weights_or_none() is not None
        weights = features.weights().split(per_key) if weighted else [None] * len(per_key)
        out_keys, out_values, out_lengths, out_weights = [], [], [], []
        for key, ids, bag_lengths, w in zip(features.keys(), values, lengths, weights):
            m = self.remainders.get(key)
            if m is None:
                out_keys.append(key)
                out_values.append(ids)
                out_lengths.append(bag_lengths)
                out_weights.append(w)
                continue
            if ids.numel() and int(bag_lengths.max()) > 1:
                raise ValueError(
                    f"feature {key!r} has a bag of {int(bag_lengths.max())} ids: QR embeddings "
                    "multiply pooled sums, which is the QR embedding only for single-hot bags"
                )
            out_keys += qr_keys(key)
            out_values += [torch.div(ids, m, rounding_mode="floor"), torch.remainder(ids, m)]
            out_lengths += [bag_lengths, bag_lengths]
            out_weights += [w, None if w is None else torch.ones_like(w)]
        return KeyedJaggedTensor(
            keys=out_keys,
            values=torch.cat(out_values),
            lengths=torch.cat(out_lengths),
            weights=torch.cat(out_weights) if weighted else None,
            stride=batch,
        )


class QREmbedding(nn.Module):
    """QR and full tables in one EBC, read as ``[B, F, K]`` fields in ``keys`` order.

    Args:
        plan: which features are QR and their remainder counts.
        keys: the model's feature keys, in field order.
        init_scale: ``s`` of the project's ``uniform(-s, s)`` init (see ``qr_table_configs``).
        weighted: whether features carry weights (the paper's dense fields).
        device: where the tables go (``meta`` before sharding).

    Its input is a batch rewritten by ``QRKeyWriter(plan)``.
    """

    def __init__(
        self, plan: QRPlan, keys: Sequence[str], init_scale: float,
        weighted: bool = False, device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.keys = list(keys)
        self.embedding_dim = plan.embedding_dim
        self.ebc = EmbeddingBagCollection(qr_table_configs(plan, init_scale), is_weighted=weighted, device=device)

    @property
    def num_fields(self) -> int:
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        # By name: a sharded EBC orders its output keys by shard.
        pooled = self.ebc(features).to_dict()
        fields = []
        for key in self.keys:
            if key in self.plan.remainders:
                quotient_key, remainder_key = qr_keys(key)
                fields.append(pooled[quotient_key] * pooled[remainder_key])
            else:
                fields.append(pooled[key])
        return torch.stack(fields, dim=1)
