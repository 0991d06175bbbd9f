"""CTR models by name; each takes its embedding module as an argument.

Example:
    >>> model = build_model(ModelConfig(name="fm", embedding_dim=4), embedding,
    ...                     num_fields=3, num_dense=0)   # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from pipeline.config import ModelConfig
from pipeline.models.base import CTRModel
from pipeline.models.dcnv2 import DCNv2
from pipeline.models.deepfm import DeepFM
from pipeline.models.dlrm import DLRM
from pipeline.models.fm import FM
from pipeline.models.wide_deep import WideDeep

MODELS: dict[str, type[CTRModel]] = {
    "fm": FM,
    "wide_deep": WideDeep,
    "deepfm": DeepFM,
    "dlrm": DLRM,
    "dcnv2": DCNv2,
}


def build_model(cfg: ModelConfig, embedding: nn.Module, num_fields: int, num_dense: int) -> CTRModel:
    """Instantiate ``MODELS[cfg.name]`` around ``embedding``."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; known: {sorted(MODELS)}")
    return MODELS[cfg.name](embedding, num_fields, num_dense, cfg)
