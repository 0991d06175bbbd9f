"""Rows of an EBC's pooled output, read as fields by key and scaled, with one gradient write.

The α-EBC needs ``[rows, F, K]`` fields in its own key order, scaled by α, for a slice of
the batch (train rows, then validation rows). Built from TorchRec's ``KeyedTensor.regroup``
and tensor slicing, that costs a copy per op and, in backward, a zero-filled full-size
gradient per slice plus two more copies for the regroup: about half of the search step's
overhead over a plain step on 2 CPU ranks (README, Benchmarks). ``scaled_fields`` reads
the fields straight from ``KeyedTensor.values()`` (the columns of key ``i`` are
``[i*K, (i+1)*K)`` when every key has width ``K``) and writes the gradient of the EBC's
whole output once, zeros outside the rows it read. Values and gradients are
bit-identical to the unfused ops.

Example:
    >>> kt = KeyedTensor(["b", "a"], [2, 2], torch.arange(8.0).view(2, 4))
    >>> order = field_order(kt, ["a", "b"])
    >>> scaled_fields(kt.values(), order, torch.ones(1, 2, 2), start=1).tolist()
    [[[6.0, 7.0], [4.0, 5.0]]]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedTensor


def field_order(pooled: KeyedTensor, names: Sequence[str]) -> torch.Tensor:
    """Position of each of ``names`` among ``pooled``'s keys (a sharded EBC orders its
    output keys by shard), so that ``values.view(B, F, K)[:, order]`` is in ``names`` order.

    Raises:
        ValueError: when the keys are not exactly ``names`` or not all of one width.
    """
    keys = pooled.keys()
    if sorted(keys) != sorted(names) or len(set(pooled.length_per_key())) != 1:
        widths = pooled.length_per_key()
        raise ValueError(f"pooled keys {keys} (widths {widths}) do not match {list(names)}")
    position = {key: i for i, key in enumerate(keys)}
    return torch.tensor([position[name] for name in names], device=pooled.values().device)


class _ScaledFields(torch.autograd.Function):
    """``values.view(B, F, K)[start:start+m].index_select(1, order) * scale``; see module."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, order: torch.Tensor, scale: torch.Tensor, start: int):
        rows, (m, _, k) = values.size(0), scale.shape
        fields = values.view(rows, -1, k)[start : start + m].index_select(1, order)
        ctx.rows, ctx.start = rows, start
        keep_fields = ctx.needs_input_grad[2]  # ∂/∂scale needs the unscaled fields
        ctx.save_for_backward(order, scale, fields if keep_fields else None)
        return fields * scale if keep_fields else fields.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, scale, fields = ctx.saved_tensors
        grad_values: Optional[torch.Tensor] = None
        if ctx.needs_input_grad[0]:
            m, f, k = scale.shape
            start, stop = ctx.start, ctx.start + m
            grad_values = grad.new_empty(ctx.rows, f, k)
            grad_values[:start].zero_()
            grad_values[stop:].zero_()
            torch.index_select(grad * scale, 1, torch.argsort(order), out=grad_values[start:stop])
            grad_values = grad_values.view(ctx.rows, f * k)
        grad_scale = grad * fields if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_scale, None


def scaled_fields(
    values: torch.Tensor, order: torch.Tensor, scale: torch.Tensor, start: int
) -> torch.Tensor:
    """``[m, F, K]``: rows ``[start, start + m)`` of the pooled ``values [B, F*K]``, fields
    in ``order`` (``field_order``), times ``scale [m, F, K]``.

    Gradients flow to ``values`` (zeros outside the rows read) and to ``scale``.
    """
    return _ScaledFields.apply(values, order, scale, start)
