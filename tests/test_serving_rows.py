"""Serving ids (``sharding.serving_rows``): a repacked model served on its own id
numbering, each slab re-laid as a prefix of it plus a zero row, reads exactly what the
training-time rewrite reads (dropped groups, shared rows, weights), through TorchRec's
inference TBE in fp32 and, for the zero rows, in int8 and int4; exports with a dynamic
batch; refuses ids outside a feature's numbering by name; and a vocabulary renumbered
to it maps raw values to the same rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.vocab import FieldVocab, Vocabulary
from pipeline.inference import inference_tables
from sharding.kjt import single_hot_kjt
from sharding.repack import KeyRewriter
from sharding.serving_rows import ServingRows, orthonormal_projections
from test_repack import NUMS, build_repacked, random_ids, searched, shared_reference, with_shared_rows

KEYS = list(NUMS)


class RewriteAndLookUp(torch.nn.Module):
    """Ids ``[F, B]`` -> ``[B, F, K]`` through the serving rows and the served tables."""

    def __init__(self, rewriter: torch.nn.Module, tables: torch.nn.Module) -> None:
        super().__init__()
        self.rewriter, self.tables = rewriter, tables

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tables(self.rewriter(ids))


def serving_ids(rows: ServingRows, ranks: torch.Tensor) -> torch.Tensor:
    """Ranks ``[F, B]`` in ``KEYS`` order -> serving ids."""
    return torch.stack([torch.from_numpy(rows.ids_of_ranks(key, ranks[f].numpy())) for f, key in enumerate(KEYS)])


def served(alpha_ebc, plan, bits: int = 32, weighted: bool = False, module=None):
    """``(ServingRows, the repacked module re-laid for it on the inference TBE)``; a
    learned ``module``'s projections re-based to orthonormal rows as serving does."""
    rows, module = ServingRows(plan, KEYS), module or build_repacked(alpha_ebc, plan, weighted=weighted)
    training_rows = {c.name: c.num_embeddings for c in module.ebc.embedding_bag_configs()}
    module.ebc = rows.relay(module.ebc)
    if module.learned:
        orthonormal_projections(module)
    assert {c.name: c.num_embeddings - 1 for c in module.ebc.embedding_bag_configs()} == training_rows
    return rows, inference_tables(module.eval(), bits)


@pytest.mark.parametrize("shared", [False, True])
def test_serving_ids_read_the_rows_the_training_rewrite_reads(shared):
    alpha_ebc, plan = searched(seed=3)
    plan = with_shared_rows(plan) if shared else plan
    assert any(g.width == 0 for g in plan.groups) and len({g.width for g in plan.groups}) == 3
    ranks = random_ids(4, rows=50)
    weights = torch.rand(len(KEYS), 50, generator=torch.Generator().manual_seed(5))
    training = build_repacked(alpha_ebc, plan, weighted=True)
    rows, module = served(alpha_ebc, plan, weighted=True)
    with torch.no_grad():
        expected = training(KeyRewriter(plan, KEYS)(single_hot_kjt(KEYS, ranks, weights)))
        got = module(rows(serving_ids(rows, ranks), weights))
        assert (got - expected).abs().max() < 1e-6
        if shared:  # unweighted: each id reads the mean of the ids sharing its row
            _, unweighted = served(alpha_ebc, plan)
            reference = shared_reference(alpha_ebc, plan, ranks)
            assert (unweighted(rows(serving_ids(rows, ranks))) - reference).abs().max() < 1e-6


@pytest.mark.parametrize("shared", [False, True])
def test_learned_projections_served_with_orthonormal_rows_give_the_same_outputs(shared):
    alpha_ebc, plan = searched(seed=3)
    plan = with_shared_rows(plan) if shared else plan
    training = build_repacked(alpha_ebc, plan, "learned")
    with torch.no_grad():  # projections moved off their selection, as after retraining
        for p in training.projections.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ranks = random_ids(6, rows=50)
    expected = training(KeyRewriter(plan, KEYS)(single_hot_kjt(KEYS, ranks)))
    copy = build_repacked(alpha_ebc, plan, "learned")
    copy.load_state_dict(training.state_dict())
    rows, module = served(alpha_ebc, plan, module=copy)
    with torch.no_grad():
        got = module(rows(serving_ids(rows, ranks)))
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    for key, p in module.projections.items():
        assert torch.allclose(p @ p.T, torch.eye(p.shape[0]), atol=1e-6), key
        assert not torch.allclose(p, training.projections[key]), key


@pytest.mark.parametrize("bits", [8, 4])
def test_ids_of_dropped_groups_read_exact_zeros_when_quantized(bits):
    alpha_ebc, plan = searched(seed=3)
    dropped = {key: next(g.group.start for g in plan.groups if g.group.key == key and not g.width) for key in KEYS
               if any(g.group.key == key and not g.width for g in plan.groups)}
    assert dropped
    ranks = random_ids(6, rows=20)
    for f, key in enumerate(KEYS):
        if key in dropped:
            ranks[f, ::2] = dropped[key]
    rows, module = served(alpha_ebc, plan, bits)
    with torch.no_grad():
        out = module(rows(serving_ids(rows, ranks)))
    for f, key in enumerate(KEYS):
        if key in dropped:
            assert torch.equal(out[::2, f], torch.zeros_like(out[::2, f])), key
            assert out[1::2, f].abs().sum() > 0 or not any(g.width for g in plan.groups if g.group.key == key)


def test_serving_ids_export_with_a_dynamic_batch_and_serve_as_eager():
    from pipeline.inference.exported import _fake_fbgemm_classes

    alpha_ebc, plan = searched(seed=3)
    plan = with_shared_rows(plan)
    rows, tables = served(alpha_ebc, plan)
    model = RewriteAndLookUp(rows, tables).eval()
    _fake_fbgemm_classes()
    with torch.no_grad():
        first = serving_ids(rows, random_ids(0, rows=8))
        model(first)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (first,), dynamic_shapes={"ids": {1: batch}}, strict=False)
        for n in (1, 300):
            ranks = random_ids(n, rows=n)
            assert (program.module()(serving_ids(rows, ranks)) - shared_reference(alpha_ebc, plan, ranks)).abs().max() < 1e-6


def test_slabs_too_narrow_to_quantize_keep_exact_fp32_columns_and_export():
    # Widths 0, 1, 3 and 8 of one nested order: slabs 1, 2 and 5 columns wide. At INT8 the
    # 2-wide slab quantizes and the others keep their fp32 rows, in the same kernel.
    from pipeline.inference.exported import _fake_fbgemm_classes
    from pipeline.prune.plan import group_ranges
    from plans.structured import GroupPlan, StructuredPlan
    from test_repack import K, skewed_blocking

    alpha_ebc, _ = searched(seed=3)
    groups = group_ranges(skewed_blocking(), NUMS, ranges_per_block=2)
    plan = StructuredPlan(
        tuple(GroupPlan(g, tuple(range((0, 1, 3, 8)[i % 4])), multiple=1) for i, g in enumerate(groups)), K, 0.0)
    ranks = random_ids(7, rows=40)
    with torch.no_grad():
        expected = build_repacked(alpha_ebc, plan)(KeyRewriter(plan, KEYS)(single_hot_kjt(KEYS, ranks)))
        rows, module = served(alpha_ebc, plan, bits=8)
        got = module(rows(serving_ids(rows, ranks)))
        fp32, int8 = [0, 3, 4, 5, 6, 7], [1, 2]
        assert torch.equal(got[:, :, fp32], expected[:, :, fp32])
        assert 0 < (got[:, :, int8] - expected[:, :, int8]).abs().max() < 0.01
        model = RewriteAndLookUp(rows, module).eval()
        _fake_fbgemm_classes()
        first = serving_ids(rows, random_ids(0, rows=8))
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (first,), dynamic_shapes={"ids": {1: batch}}, strict=False)
        for n in (1, 300):
            ids = serving_ids(rows, random_ids(n, rows=n))
            assert torch.equal(program.module()(ids), model(ids)), n


def test_ids_outside_a_features_numbering_are_refused_by_name():
    _, plan = searched(seed=3)
    rows = ServingRows(plan, KEYS)
    ids = serving_ids(rows, random_ids(2, rows=10))
    for f, key in enumerate(KEYS):
        top = int(rows.top[f])
        assert int(serving_ids(rows, torch.tensor([[NUMS[k] - 1] for k in KEYS]))[f]) <= top
        for bad in (top + 1, -1):
            wrong = ids.clone()
            wrong[f, 3] = bad
            with pytest.raises(ValueError, match=f"id {bad} of {key} is outside its serving ids 0..{top}"):
                rows(wrong)


def test_a_renumbered_vocabulary_maps_raw_values_to_the_serving_ids_of_their_ranks():
    _, plan = searched(seed=3)
    rows = ServingRows(plan, KEYS)
    n = NUMS["a"]
    ranks = np.random.default_rng(0).permutation(n).astype(np.int32)  # raw value 10 * j has rank ranks[j]
    oov = int(ranks[-1])
    vocab = Vocabulary({"a": FieldVocab(np.arange(0, 10 * (n - 1), 10), np.delete(ranks, -1), oov)})
    renumbered = vocab.renumbered({"a": lambda ids: rows.ids_of_ranks("a", ids)})
    raw = np.array([0, 30, 10 * (n - 2), 7])  # 7 was never seen: OOV
    expected = rows.ids_of_ranks("a", np.array([*ranks[[0, 3, n - 2]], oov]))
    assert renumbered.fields["a"].ids_of(raw).tolist() == expected.tolist()
    assert vocab.fields["a"].ids_of(raw).tolist() == [*ranks[[0, 3, n - 2]], oov]  # the original is untouched
