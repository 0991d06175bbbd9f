"""Statistics of embedding tables read from whatever shards this rank holds.

Every sharding type TorchRec offers leaves each rank with rectangular pieces of some
tables (whole tables, column slices, row slices, grid rectangles; several pieces of one
table may sit on one rank) at global offsets (``sharding.shard_pieces``); data-parallel
tables are whole on every rank. The statistics here add up what the pieces hold and sum
over ranks, so no table is ever gathered on one rank. The pieces alias the tables, so
``pipeline.prune.fine`` also edits them in place.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipeline.prune.plan import Group
from sharding.field_embedding import table_name
from sharding.shard_pieces import local_pieces


def feature_tables(model: nn.Module, keys: Sequence[str]) -> dict[str, object]:
    """Per feature key, its table ``t_<key>`` in ``model``'s state: a tensor, ShardedTensor or DTensor."""
    state = model.state_dict()
    out = {}
    for key in keys:
        suffix = f"embedding_bags.{table_name(key)}.weight"
        names = [n for n in state if n.endswith(suffix)]
        if len(names) != 1:
            raise KeyError(f"table of feature {key!r}: expected one '*{suffix}' in the model, got {names}")
        out[key] = state[names[0]]
    return out


def group_rows(group: Group, row: int, rows: int) -> tuple[int, int]:
    """Local ``[lo, hi)`` of ``group``'s ids in a piece of ``rows`` rows starting at id ``row``."""
    return min(max(group.start - row, 0), rows), min(max(group.stop - row, 0), rows)


def group_sum_sq(model: nn.Module, groups: Sequence[Group], embedding_dim: int) -> torch.Tensor:
    """``[len(groups), K]``: per group, ``Σ_{id in [start, stop)} E[id, j]²`` (float64).

    ``model`` holds one table ``t_<key>`` per feature (an α-EBC or plain EBC, sharded
    by ``DistributedModelParallel`` or not). Replicated tables are counted on rank 0.
    """
    by_key: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        by_key[group.key].append(index)
    out = torch.zeros(len(groups), embedding_dim, dtype=torch.float64)
    for key, tensor in feature_tables(model, list(by_key)).items():
        for row, col, values in local_pieces(tensor, counted_once=is_rank0()):
            # Prefix sums over rows: a group's sum is the difference of two of them.
            prefix = torch.cat([values.new_zeros(1, values.shape[1], dtype=torch.float64),
                                (values.detach().double() ** 2).cumsum(0)])
            for index in by_key[key]:
                lo, hi = group_rows(groups[index], row, values.shape[0])
                # Pieces may sit on a GPU; the result (all-reduced below) is on the CPU.
                out[index, col : col + values.shape[1]] += (prefix[hi] - prefix[lo]).cpu()
    return all_reduce_sum(out)


def is_rank0() -> bool:
    """Whether this process counts replicated tables (rank 0, or no process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (NCCL gets a CUDA copy) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        on_nccl = dist.get_backend() == "nccl"
        reduced = tensor.to(torch.device("cuda", torch.cuda.current_device())) if on_nccl else tensor
        dist.all_reduce(reduced)
        tensor.copy_(reduced)
    return tensor
