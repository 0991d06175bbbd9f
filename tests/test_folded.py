"""Serving folds a model's interaction onto the repacked model's pooled slab columns
(``pipeline.models.folded``): the folded logits equal the model's own."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import build_model
from sharding.kjt import single_hot_kjt
from sharding.repack import KeyRewriter
from test_repack import K, NUMS, build_repacked, random_ids, searched

DENSE = 3  # dense values of the bottom-MLP case
NARROW = 3  # a seed of test_repack.searched whose plan pools 20 of the fields' 24 columns


def repacked_model(name: str, projection: str, num_dense: int, seed: int = NARROW):
    """A model on a repacked embedding with random weights (and random learned
    projections, so that their Gram matrix is not the identity), and its plan."""
    alpha_ebc, plan = searched(seed)
    embedding = build_repacked(alpha_ebc, plan, projection)
    # A wide first layer, as real MLPs have: folding pays when that layer dominates.
    cfg = ModelConfig(name=name, embedding_dim=K, mlp_dims=(256, 8), bottom_mlp_dims=(8,))
    model = build_model(cfg, embedding, num_fields=len(NUMS), num_dense=num_dense).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model, plan


@pytest.mark.parametrize("name, projection, num_dense, seed", [
    *[(name, projection, num_dense, NARROW) for name in ("deepfm", "wide_deep")
      for projection in ("selection", "learned") for num_dense in (0, DENSE)],
    # A selection pooling every column of the fields still folds: placing them is the cost.
    ("deepfm", "selection", DENSE, 0), ("fm", "selection", 0, 0),
])
def test_folded_interaction_equals_the_model_on_its_pooled_columns(name, projection, num_dense, seed):
    model, plan = repacked_model(name, projection, num_dense, seed)
    embedding = model.embedding
    folded = model.folded(embedding.output_map()).eval()
    assert (folded.gram is None) == (projection == "selection")
    assert (folded.places is not None) == (projection == "selection")
    for seed in range(3):
        sparse = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), random_ids(seed)))
        dense = torch.randn(sparse.stride(), num_dense)
        pooled = embedding.ebc(sparse)
        with torch.no_grad():
            fields = (pooled.values() @ embedding.output_map()).view(-1, len(NUMS), K)
            assert torch.allclose(fields, embedding(sparse), atol=1e-6)
            expected, got = model(dense, sparse), folded(dense, pooled.values())
        assert expected.abs().max() > 1.0  # the weights make every term count
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (got - expected).abs().max()


def test_the_folded_first_layer_reads_only_the_pooled_columns():
    model, _ = repacked_model("deepfm", "selection", 0)
    folded = model.folded(model.embedding.output_map())
    columns = sum(s.width for s in model.embedding.slabs.slabs)
    assert columns == len(NUMS) * K - 4
    # first_order's and deep's first layers in one: 1 + 256 outputs (a selection's FM sums add no columns)
    assert folded.first_t.shape == (columns, 1 + 256)


@pytest.mark.parametrize("name, projection, seed", [
    ("deepfm", "learned", 0),  # every column pooled: the Gram term costs C² per row
    ("fm", "learned", NARROW),  # an FM's interaction costs less than the projected FM sums
    ("dcnv2", "selection", NARROW), ("dlrm", "selection", NARROW),  # fields meet a non-linearity first
])
def test_models_are_not_folded_where_it_would_not_pay_or_is_not_linear(name, projection, seed):
    model, _ = repacked_model(name, projection, 0, seed)
    assert model.folded(model.embedding.output_map()) is None


@pytest.mark.parametrize("projection", ["selection", "learned"])  # FM sums by index_add / product
def test_the_folded_interaction_exports_with_a_dynamic_batch(projection):
    model, _ = repacked_model("deepfm", projection, DENSE)
    folded = model.folded(model.embedding.output_map()).eval()
    columns = sum(s.width for s in model.embedding.slabs.slabs)
    batch = torch.export.Dim("batch", min=1)
    example = (torch.randn(8, DENSE), torch.randn(8, columns))
    program = torch.export.export(folded, example, dynamic_shapes=({0: batch}, {0: batch})).module()
    for rows in (1, 300):
        dense, pooled = torch.randn(rows, DENSE), torch.randn(rows, columns)
        with torch.no_grad():
            assert torch.equal(program(dense, pooled), folded(dense, pooled)), rows


def test_served_learned_projections_fold_with_a_plain_norm_and_the_same_logits():
    from sharding.serving_rows import ServingRows, orthonormal_projections

    model, plan = repacked_model("deepfm", "learned", DENSE)
    sparse = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), random_ids(2)))
    dense = torch.randn(sparse.stride(), DENSE)
    with torch.no_grad():
        expected = model(dense, sparse)
        assert model.folded(model.embedding.output_map()).gram is not None
        rows = ServingRows(plan, list(NUMS))
        model.embedding.ebc = rows.relay(model.embedding.ebc)
        orthonormal_projections(model.embedding)
        folded = model.folded(model.embedding.output_map()).eval()
        ids = torch.stack([torch.from_numpy(rows.ids_of_ranks(k, random_ids(2)[f].numpy())) for f, k in enumerate(NUMS)])
        got = folded(dense, model.embedding.ebc(rows(ids)).values())
    assert folded.gram is None
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3), (got - expected).abs().max()



@pytest.mark.parametrize("name, projection, seed", [
    ("deepfm", "selection", NARROW), ("wide_deep", "selection", NARROW), ("fm", "selection", 0),
    ("deepfm", "learned", NARROW),
])
def test_dense_rows_taken_out_of_the_pooled_columns_give_the_same_logits(name, projection, seed):
    from sharding.serving_rows import ServingRows, orthonormal_projections

    model, plan = repacked_model(name, projection, 0, seed)
    if projection == "learned":  # served: re-based to orthonormal rows, no Gram term
        with torch.no_grad():
            with pytest.raises(ValueError, match="Gram"):
                model.folded(model.embedding.output_map()).take_dense_rows(torch.ones(1, 1))
            model.embedding.ebc = ServingRows(plan, list(NUMS)).relay(model.embedding.ebc)
            orthonormal_projections(model.embedding)
    folded = model.folded(model.embedding.output_map()).eval()
    # The first two features' slabs stand for two dense keys: each its own columns.
    slabs = model.embedding.slabs.by_key
    widths = [sum(s.width for s in slabs[key]) for key in list(NUMS)[:2]]
    rows = torch.zeros(2, sum(widths))
    rows[0, : widths[0]], rows[1, widths[0] :] = torch.randn(widths[0]), torch.randn(widths[1])
    taken = model.folded(model.embedding.output_map()).eval()
    taken.take_dense_rows(rows)
    assert taken.first_t.shape[0] == folded.first_t.shape[0] - rows.shape[1]
    dense, pooled = torch.randn(50, 2), torch.randn(50, folded.first_t.shape[0] - rows.shape[1])
    with torch.no_grad():
        expected, got = folded(None, torch.cat([dense @ rows, pooled], dim=1)), taken(dense, pooled)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (got - expected).abs().max()
    # Dense keys the plan gives no column (width 0): no columns to take, the same logits.
    none = model.folded(model.embedding.output_map()).eval()
    none.take_dense_rows(torch.zeros(2, 0))
    full = torch.randn(50, folded.first_t.shape[0])
    with torch.no_grad():
        assert torch.allclose(none(dense, full), folded(None, full), rtol=1e-5, atol=1e-4)


def test_a_linear_head_with_more_than_one_output_is_refused():
    from torch import nn

    from pipeline.models.folded import folded_interaction

    lift = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="one output"):
        folded_interaction(None, [nn.Linear(4, 2)], lift, 2, fm=False)
