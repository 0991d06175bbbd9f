"""A model's interaction trained folded onto a repacked embedding's pooled columns.

Serving folds a copy of the heads once (``pipeline.models.folded``); retraining folds
the live weights each step, so the parameters keep their shapes (checkpoints, export and
serving read them as before). A head's first layer ``W`` (``[out, F * K]``) reads the
``C`` pooled columns through ``ColumnLift.fold(W)`` (``sharding.column_lift``):
``C × out`` multiply-adds per row instead of ``F * K × out`` (at CR 10 a fifth to a
half: 260 or 624 of 1,248 columns), plus a per-step product of the weights, not of the
rows. The FM term takes ``ColumnLift.field_sums``: a selection never builds the
``[B, F, K]`` fields, a learned projection builds them one product per feature, as the
unfolded model does. Outputs and gradients equal the unfolded model's up to float
rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.functional import linear

from sharding.column_lift import ColumnLift
from sharding.squared_norm import squared_norm

torch.fx.wrap("squared_norm")  # a leaf when the train pipeline traces the model

if TYPE_CHECKING:
    from pipeline.models.base import CTRModel


def folded_head(head: nn.Module, x: torch.Tensor, lift: ColumnLift, lead: int) -> torch.Tensor:
    """``head`` (a linear layer, or a ``Sequential`` that starts with one) of ``x``, its
    first layer folded; the first ``lead`` inputs (the dense field) pass as they are."""
    layers = [head] if isinstance(head, nn.Linear) else list(head)
    first = layers[0]
    weight = lift.fold(first.weight[:, lead:])
    if lead:
        weight = torch.cat([first.weight[:, :lead], weight], dim=1)
    out = linear(x, weight, first.bias)
    for layer in layers[1:]:
        out = layer(out)
    return out


def column_fold_logits(model: "CTRModel", dense: torch.Tensor, pooled: torch.Tensor, lift: ColumnLift) -> torch.Tensor:
    """Logits ``[B]`` of ``model`` (one that names ``folded_heads``) from its dense values
    and its embedding's pooled columns ``[B, C]``."""
    field = None if model.dense_arch is None else model.dense_arch(dense)
    x = pooled if field is None else torch.cat([field, pooled], dim=1)
    lead = 0 if field is None else model.embedding_dim
    heads = [getattr(model, name) for name in model.folded_heads]
    out = sum(folded_head(head, x, lift, lead) for head in heads).squeeze(1)
    if not model.folded_fm:
        return out
    field_sum, sum_of_squares = lift.field_sums(pooled)
    if field is not None:
        field_sum = field_sum + field
        sum_of_squares = sum_of_squares + squared_norm(field, 1)
    return out + 0.5 * (field_sum.square().sum(dim=1) - sum_of_squares)
