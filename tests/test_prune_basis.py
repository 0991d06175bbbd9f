"""Pruning principal columns (``pipeline.prune.basis``): each feature's rows turned by
the eigenvectors of their count-weighted Gram matrix, the learned projection turning
them back (``sharding.repack``)."""

from __future__ import annotations

import pytest
import torch

from launch.prune import parse_args
from pipeline.prune.basis import principal_basis
from plans.structured import GroupPlan, StructuredPlan
from sharding.kjt import single_hot_kjt
from sharding.repack import KeyRewriter, RepackedEmbedding, load_repacked_weights, repacked_weights, rotated_projections
from sharding.table_stats import group_gram, group_sum_sq
from test_repack import K, NUMS, random_ids, searched


def turned(seed: int = 0, widths=None):
    """A searched α-EBC, its principal basis (every group the same mass per id) and the
    repacked model keeping each group's first ``widths[group]`` principal columns."""
    alpha_ebc, plan = searched(seed)
    groups = [g.group for g in plan.groups]
    gram = group_gram(alpha_ebc, groups, K)
    mass = [g.rows * 10 for g in groups]
    rotations, sum_sq = principal_basis(groups, gram, alpha_ebc.alpha.detach(), mass)
    widths = widths or [K] * len(groups)
    turned_plan = StructuredPlan(tuple(GroupPlan(g, tuple(range(w)), 1) for g, w in zip(groups, widths)), K, 0.0)
    module = RepackedEmbedding(turned_plan, list(NUMS), "learned")
    tables = {k: alpha_ebc.ebc.embedding_bags[f"t_{k}"].weight.detach() for k in NUMS}
    load_repacked_weights(module, repacked_weights(turned_plan, list(NUMS), tables, alpha_ebc.alpha.detach(), rotations))
    with torch.no_grad():
        for key, projection in rotated_projections(turned_plan, list(NUMS), rotations).items():
            module.projections[key].copy_(projection)
    return alpha_ebc, rotations, sum_sq, turned_plan, module


def test_the_basis_is_orthonormal_keeps_each_groups_energy_and_sorts_it():
    alpha_ebc, plan = searched(1)
    groups = [g.group for g in plan.groups]
    alpha = alpha_ebc.alpha.detach()
    rotations, sum_sq = principal_basis(groups, group_gram(alpha_ebc, groups, K), alpha, [g.rows for g in groups])
    scaled = group_sum_sq(alpha_ebc, groups, K) * alpha[[g.block for g in groups]].double() ** 2
    assert torch.allclose(sum_sq.sum(1), scaled.sum(1), rtol=1e-9)
    for key, rotation in rotations.items():
        assert torch.allclose(rotation.T @ rotation, torch.eye(K), atol=1e-5)
        energy = sum_sq[[i for i, g in enumerate(groups) if g.key == key]].sum(0)  # one mass per id here
        assert (energy[:-1] >= energy[1:] - 1e-9).all(), key


def test_all_principal_columns_give_the_alpha_model_back():
    alpha_ebc, _, _, plan, module = turned()
    for seed in range(3):
        ids = random_ids(seed)
        expected = alpha_ebc(single_hot_kjt(list(NUMS), ids))
        got = module(KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), ids)))
        assert (got - expected).abs().max() < 1e-5


def test_a_narrow_group_keeps_its_rows_projection_on_the_top_principal_directions():
    widths = [1 + i % 6 for i in range(len(searched()[1].groups))]
    alpha_ebc, rotations, _, plan, module = turned(2, widths)
    ids = random_ids(5)
    full = alpha_ebc(single_hot_kjt(list(NUMS), ids))
    got = module(KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), ids)))
    assert (got - full).abs().max() > 0.01  # the narrow groups lose something
    for f, key in enumerate(NUMS):
        for g in (g for g in plan.groups if g.group.key == key):
            rows = (ids[f] >= g.group.start) & (ids[f] < g.group.stop)
            top = rotations[key][:, : g.width]
            assert torch.allclose(got[rows, f], full[rows, f] @ top @ top.T, atol=1e-5), (key, g.width)


def test_principal_columns_need_the_learned_projection():
    with pytest.raises(SystemExit):
        parse_args(["--run-dir", "r", "--cr", "10", "--basis", "principal", "--projection", "selection"])
    assert parse_args(["--run-dir", "r", "--cr", "10", "--basis", "principal"]).projection == "learned"
    assert parse_args(["--run-dir", "r", "--cr", "10"]).projection == "selection"
