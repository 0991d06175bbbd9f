"""The QR baseline: the embedding is the quotient row times the remainder row, the table
sizes meet the byte budget, sharded steps equal unsharded ones, and ``launch.train``
trains and reports it."""

from __future__ import annotations

import json

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from launch_helpers import finish, search_args, torchrun
from pipeline.config import ConfigError, load_config
from pipeline.search.qr import plan_qr
from plans.qr import QRPlan, qr_rows
from sharding.kjt import single_hot_kjt
from sharding.local_ranks import run_ranks
from sharding.qr_embedding import QREmbedding, QRKeyWriter
from test_alpha_parity import max_diff
from test_repack import Probe

K = 8
SPARSE_LR, DENSE_LR = 0.1, 1e-2
SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")


def test_qr_embedding_equals_the_hand_computed_product_weighted_and_unweighted():
    plan = QRPlan({"d": 1, "a": 10}, embedding_dim=2, remainders={"a": 4})
    for weighted in (False, True):
        module = QREmbedding(plan, ["d", "a"], init_scale=0.1, weighted=weighted)
        bags = module.ebc.embedding_bags
        assert bags["t_a@q"].weight.shape == (3, 2) and bags["t_a@r"].weight.shape == (4, 2)
        with torch.no_grad():
            bags["t_d"].weight.copy_(torch.tensor([[5.0, 7.0]]))
            bags["t_a@q"].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
            bags["t_a@r"].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5], [3.0, 10.0], [0.0, 0.0]]))
        ids = torch.tensor([[0, 0], [9, 2]])  # a: 9 = 2·4 + 1, 2 = 0·4 + 2
        weights = torch.tensor([[3.0, 4.0], [0.5, 2.0]]) if weighted else None
        out = module(QRKeyWriter(plan)(single_hot_kjt(["d", "a"], ids, weights)))
        w = weights if weighted else torch.ones(2, 2)
        expected = torch.tensor([
            [[5.0 * w[0, 0], 7.0 * w[0, 0]], [5.0 * 2.0 * w[1, 0], 6.0 * 0.5 * w[1, 0]]],
            [[5.0 * w[0, 1], 7.0 * w[0, 1]], [1.0 * 3.0 * w[1, 1], 2.0 * 10.0 * w[1, 1]]],
        ])
        assert torch.allclose(out, expected), (weighted, out)


def test_quotient_tables_start_near_one_so_products_start_at_the_full_scale():
    plan = QRPlan({"a": 1000}, embedding_dim=K, remainders={"a": 40})
    bags = QREmbedding(plan, ["a"], init_scale=0.01).ebc.embedding_bags
    quotient, remainder = bags["t_a@q"].weight, bags["t_a@r"].weight
    assert (quotient - 1).abs().max() <= 0.01 and remainder.abs().max() <= 0.01
    assert remainder.abs().mean() > 0.002  # not s² small


def test_key_writer_refuses_multi_hot_qr_features_and_passes_others():
    plan = QRPlan({"m": 3, "a": 10}, embedding_dim=2, remainders={"a": 4})
    multi_hot_other = KeyedJaggedTensor(["m", "a"], torch.tensor([0, 1, 2, 7, 3]), lengths=torch.tensor([2, 1, 1, 1]))
    out = QRKeyWriter(plan)(multi_hot_other)
    assert out.keys() == ["m", "a@q", "a@r"]
    assert out.values().tolist() == [0, 1, 2, 1, 0, 3, 3] and out.lengths().tolist() == [2, 1, 1, 1, 1, 1]
    multi_hot_qr = KeyedJaggedTensor(["m", "a"], torch.tensor([0, 7, 3]), lengths=torch.tensor([1, 0, 0, 2]))
    with pytest.raises(ValueError, match="'a' has a bag of 2 ids"):
        QRKeyWriter(plan)(multi_hot_qr)


TABLE_MIXES = {
    "criteo-like": {**{f"I{i}": 1 for i in range(13)}, **{f"C{i}": n for i, n in enumerate(
        [1460, 583, 10_131_227, 2_202_608, 305, 24, 12_517, 633, 3, 93_145, 5_683, 8_351_593, 3_194,
         27, 14_992, 5_461_306, 10, 5_652, 2_173, 4, 7_046_547, 18, 15, 286_181, 105, 142_572])}},
    "one big table": {"big": 5_000_000, "small": 500},
    "equal tables": {f"t{i}": 200_000 for i in range(8)},
    "many mid tables": {f"t{i}": 3_000 + 977 * i for i in range(30)},
}


@pytest.mark.parametrize("mix", TABLE_MIXES)
@pytest.mark.parametrize("target_cr", [2.0, 10.0, 40.0])
def test_collisions_meet_the_budget_within_a_tenth_of_a_percent(mix, target_cr):
    sizes = TABLE_MIXES[mix]
    plan = plan_qr(sizes, embedding_dim=K, min_rows=1000, target_cr=target_cr)
    assert plan.compression_ratio() >= target_cr  # bytes never above unpruned / CR
    assert plan.compression_ratio() < target_cr * 1.001, plan.compression_ratio()
    assert all(sizes[k] > 1000 for k in plan.remainders)
    assert all(qr_rows(sizes[k], m) < sizes[k] for k, m in plan.remainders.items())


def test_unreachable_cr_names_the_highest_reachable_one():
    sizes = {"big": 10_000, "small": 800}  # best: big at 100 + 100 rows, small stays full
    best = 10.8  # 10,800 / (200 + 800)
    with pytest.raises(ValueError, match=f"highest reachable CR is {best:.4g}"):
        plan_qr(sizes, embedding_dim=K, min_rows=1000, target_cr=best + 0.1)
    plan = plan_qr(sizes, embedding_dim=K, min_rows=1000, target_cr=best)
    assert plan.remainders == {"big": 100} and plan.compression_ratio() == best


def test_qr_config_values_are_checked():
    cfg = load_config([], ["model.embedding=qr", "model.qr_target_cr=10"])
    assert cfg.model.qr_target_cr == 10.0 and cfg.model.qr_min_rows == 1000
    with pytest.raises(ConfigError, match="model.embedding 'hash'"):
        load_config([], ["model.embedding=hash"])
    with pytest.raises(ConfigError, match="model.qr_target_cr must be > 1"):
        load_config([], ["model.embedding=qr"])
    with pytest.raises(ConfigError, match="model.qr_min_rows must be >= 1"):
        load_config([], ["model.qr_min_rows=0"])


PLAN = QRPlan({"d": 1, "a": 60, "b": 17, "c": 5}, embedding_dim=K, remainders={"a": 8, "b": 5})
KEYS = list(PLAN.num_embeddings)


def rank_batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    ids = torch.stack([torch.randint(0, n, (16,), generator=g) for n in PLAN.num_embeddings.values()])
    kjt = single_hot_kjt(KEYS, ids, torch.rand(ids.shape, generator=g) + 0.5)
    return QRKeyWriter(PLAN)(kjt), torch.randn(16, len(KEYS), K, generator=g)


def reference_step(world_size: int):
    """Unsharded: one SGD (tables) / Adam (dense) step on the mean of every rank's loss."""
    torch.manual_seed(0)
    full = Probe(QREmbedding(PLAN, KEYS, init_scale=0.5, weighted=True))
    start = {k: v.clone() for k, v in full.state_dict().items()}
    outs = [full(kjt) for kjt, _ in map(rank_batch, range(world_size))]
    torch.stack([(o * rank_batch(r)[1]).sum() for r, o in enumerate(outs)]).mean().backward()
    tables = [p for n, p in full.named_parameters() if ".embedding_bags." in n]
    torch.optim.SGD(tables, lr=SPARSE_LR).step()
    torch.optim.Adam([full.scale], lr=DENSE_LR).step()
    return full, start, [o.detach() for o in outs], {k: v.clone() for k, v in full.state_dict().items()}


def sharded_sgd(env, full: Probe, sharding_type: str):
    """A meta copy of ``full`` sharded with ``sharding_type``, its values, and its
    optimizer (tables: SGD, fused in backward as TorchRec runs it)."""
    from torchrec.distributed.planner.types import ParameterConstraints

    from sharding.checkpoint import load_full_state
    from sharding.dmp import make_optimizer, shard_model

    meta = Probe(QREmbedding(PLAN, KEYS, init_scale=0.5, weighted=True, device=torch.device("meta")))
    constraints = {
        c.name: ParameterConstraints(sharding_types=[sharding_type], min_partition=4)
        for c in meta.embedding.ebc.embedding_bag_configs()
    }
    dmp = shard_model(meta, env, "sgd", SPARSE_LR, constraints=constraints)
    load_full_state(dmp, full.state_dict())
    return dmp, make_optimizer(dmp, DENSE_LR, "sgd", SPARSE_LR)


def sharded_vs_unsharded(env) -> dict:
    full, start, outs, after = reference_step(env.world_size)
    full.load_state_dict(start)
    kjt, target = rank_batch(env.rank)
    diffs = {}
    for kind in SHARDING_TYPES:
        dmp, optimizer = sharded_sgd(env, full, kind)
        kinds = {s.sharding_type for p in dmp.plan.plan.values() for s in p.values()}
        out = dmp(kjt)
        (out * target).sum().backward()
        optimizer.step()
        state = dmp.state_dict()
        diffs[kind] = {
            "plan": kinds == {kind},
            "outputs": (out - outs[env.rank]).abs().max().item(),
            "after_step": max_diff(state, after),
            "moved": max_diff(state, start),
        }
    return diffs


@pytest.mark.multirank
def test_sharded_qr_step_equals_unsharded_for_every_cpu_sharding_type():
    for rank_diffs in run_ranks(sharded_vs_unsharded, 2):
        for kind, d in rank_diffs.items():
            assert d["plan"] and d["outputs"] < 1e-5 and d["after_step"] < 1e-5, (kind, d)
            assert d["moved"] > 1e-3, (kind, d)  # the step did change the weights


@pytest.mark.multirank
def test_train_entry_point_trains_qr_on_two_ranks_and_evaluate_rebuilds_it(dataset, tmp_path):
    run = tmp_path / "qr"
    qr = ["--set", "model.embedding=qr", "--set", "model.qr_target_cr=4", "--set", "model.qr_min_rows=50"]
    out = finish(torchrun("launch.train", *search_args(dataset, run, *qr), "--set", "train.max_steps=8"))
    assert "test auc" in out
    result = json.loads((run / "result.json").read_text())
    assert result["embedding"] == "qr" and result["qr_remainders"]
    assert 4.0 <= result["compression_ratio"] < 4.0 * 1.05, result
    assert result["embedding_bytes"] * result["compression_ratio"] == pytest.approx(result["unpruned_bytes"])
    evaluated = finish(torchrun("launch.evaluate", "--run-dir", str(run), "--no-progress", nproc=1))
    assert f"test: auc {result['test']['auc']:.5f} logloss {result['test']['logloss']:.5f}" in evaluated
