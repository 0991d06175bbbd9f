"""``scaled_fields`` is bit-identical to slicing, reordering and scaling with plain ops."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from sharding.scaled_fields import field_order, scaled_fields

B, K = 7, 4
KEYS_OUT = ["c", "a", "d", "b"]  # as a sharded EBC orders them: by shard
NAMES = ["a", "b", "c", "d"]


def unfused(values, scale, start, stop):
    """The same result from KeyedTensor.regroup, a row slice and a multiply."""
    kt = KeyedTensor(KEYS_OUT, [K] * len(KEYS_OUT), values)
    fields = KeyedTensor.regroup([kt], [NAMES])[0].view(B, len(NAMES), K)
    return fields[start:stop] * scale


@pytest.mark.parametrize("start,stop", [(0, B), (0, 5), (5, B), (2, 4)])
def test_values_and_both_gradients_equal_the_unfused_ops(start, stop):
    g = torch.Generator().manual_seed(start * 10 + stop)
    values = torch.randn(B, len(KEYS_OUT) * K, generator=g)
    scale = torch.rand(stop - start, len(NAMES), K, generator=g)
    grad_out = torch.randn(stop - start, len(NAMES), K, generator=g)
    results = []
    for fused in (True, False):
        v, s = values.clone().requires_grad_(), scale.clone().requires_grad_()
        if fused:
            kt = KeyedTensor(KEYS_OUT, [K] * len(KEYS_OUT), v)
            out = scaled_fields(kt.values(), field_order(kt, NAMES), s, start)
        else:
            out = unfused(v, s, start, stop)
        out.backward(grad_out)
        results.append((out.detach(), v.grad, s.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    rows_read = torch.zeros(B, dtype=torch.bool)
    rows_read[start:stop] = True
    assert (results[0][1][~rows_read] == 0).all()


def test_without_a_scale_gradient_the_output_is_the_same():
    values = torch.randn(B, len(KEYS_OUT) * K, requires_grad=True)
    scale = torch.rand(3, len(NAMES), K)
    kt = KeyedTensor(KEYS_OUT, [K] * len(KEYS_OUT), values)
    got = scaled_fields(kt.values(), field_order(kt, NAMES), scale, 2)
    assert torch.equal(got, unfused(values, scale, 2, 5))


def test_field_order_refuses_other_keys_or_mixed_widths():
    with pytest.raises(ValueError, match="do not match"):
        field_order(KeyedTensor(["a", "b"], [K, K], torch.zeros(1, 2 * K)), ["a", "c"])
    with pytest.raises(ValueError, match="do not match"):
        field_order(KeyedTensor(["a", "b"], [K, 2 * K], torch.zeros(1, 3 * K)), ["a", "b"])
