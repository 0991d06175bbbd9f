"""Sharded α-EBC search steps equal the unsharded module, for every CPU sharding type.

One spawn per world size runs every (case, sharding type): outputs, α gradients,
table and dense updates after one step, the α update, and that the α part of a step
leaves the tables unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.planner.types import ParameterConstraints

from sharding.local_ranks import run_ranks
from pipeline.search.dnis import AlphaUpdater
from search_fixtures import CASES, build_task, make_batch
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.field_embedding import table_name
from sharding.dmp import make_optimizer, shard_model, start_all_reduce_mean

SHARDING_TYPES = ["table_wise", "column_wise", "table_column_wise", "data_parallel"]
SPARSE_LR, DENSE_LR, ALPHA_LR = 0.1, 1e-2, 1e-2
pytestmark = pytest.mark.multirank


def copy_into(sharded: dict, full: dict) -> None:
    """Copy full tensors into a (possibly sharded) state dict, shard by shard."""
    for name, dst in sharded.items():
        for offsets, local in _pieces(dst):
            local.copy_(_slice(full[name], offsets, local.shape))


def max_diff(sharded: dict, full: dict) -> float:
    """Largest |sharded - full| over this rank's pieces of every tensor."""
    worst = 0.0
    for name, dst in sharded.items():
        for offsets, local in _pieces(dst):
            diff = (local - _slice(full[name], offsets, local.shape)).abs().max().item()
            worst = max(worst, diff)
    return worst


def _pieces(t):
    if isinstance(t, ShardedTensor):
        return [(s.metadata.shard_offsets, s.tensor) for s in t.local_shards()]
    return [([0] * t.dim(), t)]


def _slice(full, offsets, shape):
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]


def table_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".embedding_bags." in k}


def reference_step(case: str, world_size: int):
    """Unsharded: one step on each rank's batch, gradients averaged as DDP/TorchRec do."""
    task = build_task(case, torch.device("cpu"))
    task.train()
    start = {k: v.clone() for k, v in task.state_dict().items()}
    outs, losses = [], []
    for rank in range(world_size):
        loss, out = task(make_batch(case, seed=rank))
        task.steps_taken = 0  # every rank takes its first step
        outs.append(out)
        losses.append(loss)
    torch.stack(losses).mean().backward()
    tables = [p for n, p in task.named_parameters() if ".embedding_bags." in n]
    dense = [p for n, p in task.named_parameters() if p.requires_grad and ".embedding_bags." not in n]
    torch.optim.SGD(tables, lr=SPARSE_LR).step()
    torch.optim.Adam(dense, lr=DENSE_LR).step()
    alpha = task.model.embedding.alpha
    AlphaUpdater(alpha, ALPHA_LR).step(torch.stack([o["grad_alpha"] for o in outs]).mean(0))
    return start, outs, task.state_dict()


def sharded_step(env, case: str, sharding_type: str, start: dict):
    task = build_task(case, torch.device("meta"))
    constraints = {
        table_name(k): ParameterConstraints(sharding_types=[sharding_type], min_partition=4)
        for k in CASES[case]["nums"]
    }
    dmp = shard_model(task, env, "sgd", SPARSE_LR, constraints=constraints)
    plan_types = {s.sharding_type for p in dmp.plan.plan.values() for s in p.values()}
    assert plan_types == {sharding_type}, plan_types
    copy_into(dmp.state_dict(), start)
    optimizer = make_optimizer(dmp, DENSE_LR, "sgd", SPARSE_LR)
    alpha = next(m for m in dmp.modules() if isinstance(m, AlphaEmbeddingBagCollection)).alpha
    dmp.train()
    loss, out = dmp(make_batch(case, seed=env.rank))
    # The forward already took α's gradient on the validation rows: tables untouched.
    alpha_part_table_diff = max_diff(table_state(dmp.state_dict()), start)
    loss.backward()
    optimizer.step()
    AlphaUpdater(alpha, ALPHA_LR, start_mean=start_all_reduce_mean).step(out["grad_alpha"])
    return out, alpha_part_table_diff, dmp.state_dict()


def check_all(env, world_size: int) -> dict:
    results = {}
    for case in CASES:
        start, ref_outs, ref_after = reference_step(case, world_size)
        ref = ref_outs[env.rank]
        for sharding_type in SHARDING_TYPES:
            out, alpha_part, after = sharded_step(env, case, sharding_type, start)
            results[(case, sharding_type)] = {
                "logits": (out["logits"] - ref["logits"]).abs().max().item(),
                "val_loss": abs(out["val_loss"].item() - ref["val_loss"].item()),
                "grad_alpha": (out["grad_alpha"] - ref["grad_alpha"]).abs().max().item(),
                "alpha_part_moves_tables": alpha_part,
                "tables_after_step": max_diff(table_state(after), ref_after),
                "all_params_after_step": max_diff(after, ref_after),
                "start_differs": max_diff(table_state(after), start),
            }
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_alpha_step_matches_unsharded(world_size):
    for rank_result in run_ranks(check_all, world_size, world_size):
        for (case, sharding_type), diffs in rank_result.items():
            where = f"{case}/{sharding_type}/{world_size} ranks: {diffs}"
            assert diffs["logits"] < 1e-5, where
            assert diffs["val_loss"] < 1e-5, where
            assert diffs["grad_alpha"] < 1e-6, where
            assert diffs["alpha_part_moves_tables"] == 0.0, where
            assert diffs["tables_after_step"] < 1e-6, where
            assert diffs["all_params_after_step"] < 1e-5, where
            assert diffs["start_differs"] > 1e-4, where  # the step did update the tables
