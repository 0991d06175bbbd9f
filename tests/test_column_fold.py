"""Retraining folds the heads onto the repacked model's pooled columns
(``pipeline.models.column_fold``): the same logits and gradients as the model on its
fields, traced as TorchRec's train pipeline does, and sharded on 2 ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from sharding.kjt import single_hot_kjt
from sharding.local_ranks import run_ranks
from sharding.repack import KeyRewriter, RepackedEmbedding
from test_folded import DENSE, NARROW, repacked_model
from test_repack import META, NUMS, random_ids, shard_like

CASES = [(name, projection, num_dense) for name in ("deepfm", "fm", "wide_deep")
         for projection in ("selection", "learned") for num_dense in (0, DENSE)]


def batch(plan, seed: int, num_dense: int):
    sparse = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), random_ids(seed)))
    labels = torch.randint(0, 2, (sparse.stride(),), generator=torch.Generator().manual_seed(seed)).float()
    return torch.randn(sparse.stride(), num_dense), sparse, labels


def logits_and_grads(model, dense, sparse, labels):
    model.zero_grad()
    logits = model(dense, sparse)
    bce(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, projection, num_dense", CASES)
def test_the_folded_step_equals_the_model_on_its_fields(name, projection, num_dense):
    model, plan = repacked_model(name, projection, num_dense)
    model.train()
    unfolded = copy.deepcopy(model)
    unfolded.column_fold = False
    assert model.column_fold
    for seed in range(2):
        dense, sparse, labels = batch(plan, seed, num_dense)
        got, got_grads = logits_and_grads(model, dense, sparse, labels)
        expected, expected_grads = logits_and_grads(unfolded, dense, sparse, labels)
        assert expected.abs().max() > 1.0  # every term counts
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (got - expected).abs().max()
        assert got_grads.keys() == expected_grads.keys()
        for key, grad in expected_grads.items():
            assert torch.allclose(got_grads[key], grad, rtol=1e-4, atol=1e-4), (key, (got_grads[key] - grad).abs().max())
        assert any(key.startswith("embedding.projections") for key in got_grads) == (projection == "learned")


@pytest.mark.parametrize("name, projection, seed", [
    ("deepfm", "learned", 0),  # every column pooled: nothing to fold
    ("dcnv2", "selection", NARROW), ("dlrm", "selection", NARROW),  # fields meet a non-linearity first
])
def test_models_train_on_their_fields_where_nothing_folds(name, projection, seed):
    model, _ = repacked_model(name, projection, 0, seed)
    assert not model.column_fold


@pytest.mark.parametrize("projection", ["selection", "learned"])
def test_the_folded_model_traces_with_the_tables_as_leaves_as_the_train_pipeline_does(projection):
    from torchrec.fx import Tracer

    model, plan = repacked_model("deepfm", projection, DENSE)
    dense, sparse, _ = batch(plan, 5, DENSE)
    traced = torch.fx.GraphModule(model, Tracer(leaf_modules=["EmbeddingBagCollection"]).trace(model))
    with torch.no_grad():
        assert torch.equal(traced(dense, sparse), model(dense, sparse))


def sharded_logits(env) -> dict[str, float]:
    """Max |sharded - unsharded| logits of the folded DeepFM, per projection and kind."""
    diffs = {}
    for projection in ("selection", "learned"):
        full, plan = repacked_model("deepfm", projection, 0)
        dense, sparse, _ = batch(plan, 50 + env.rank, 0)
        for kind in ("table_wise", "column_wise"):
            meta = copy.deepcopy(full)
            meta.embedding = RepackedEmbedding(plan, list(NUMS), projection, device=META)
            sharded = shard_like(env, meta, full, kind)
            with torch.no_grad():
                diffs[f"{projection} {kind}"] = (sharded(dense, sparse) - full(dense, sparse)).abs().max().item()
    return diffs


@pytest.mark.multirank
def test_the_folded_model_sharded_on_two_ranks_equals_unsharded():
    for diffs in run_ranks(sharded_logits, 2):
        assert max(diffs.values()) < 1e-4, diffs

