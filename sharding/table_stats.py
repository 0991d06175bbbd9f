"""Statistics of embedding tables read from whatever shards this rank holds.

Every sharding type TorchRec offers leaves each rank with rectangular pieces of some
tables (whole tables, column slices, row slices) and their global offsets; data-parallel
tables are whole on every rank. The statistics here add up what the pieces hold and sum
over ranks, so no table is ever gathered on one rank.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipeline.prune.plan import Group
from sharding.field_embedding import table_name


def _pieces(tensor, counted_once: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(row offset, column offset, values)`` of the parts of ``tensor`` on this rank."""
    if hasattr(tensor, "local_shards"):
        for shard in tensor.local_shards():
            row, col = shard.metadata.shard_offsets
            yield row, col, shard.tensor
    elif counted_once:
        yield 0, 0, tensor


def _tables(model: nn.Module, keys: Sequence[str]) -> dict[str, object]:
    state = model.state_dict()
    out = {}
    for key in keys:
        suffix = f"embedding_bags.{table_name(key)}.weight"
        names = [n for n in state if n.endswith(suffix)]
        if len(names) != 1:
            raise KeyError(f"table of feature {key!r}: expected one '*{suffix}' in the model, got {names}")
        out[key] = state[names[0]]
    return out


def group_sum_sq(model: nn.Module, groups: Sequence[Group], embedding_dim: int) -> torch.Tensor:
    """``[len(groups), K]``: per group, ``Σ_{id in [start, stop)} E[id, j]²`` (float64).

    ``model`` holds one table ``t_<key>`` per feature (an α-EBC or plain EBC, sharded
    by ``DistributedModelParallel`` or not). Replicated tables are counted on rank 0.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    by_key: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        by_key[group.key].append(index)
    out = torch.zeros(len(groups), embedding_dim, dtype=torch.float64)
    for key, tensor in _tables(model, list(by_key)).items():
        for row, col, values in _pieces(tensor, counted_once=rank == 0):
            # Prefix sums over rows: a group's sum is the difference of two of them.
            prefix = torch.cat([values.new_zeros(1, values.shape[1], dtype=torch.float64),
                                (values.detach().double() ** 2).cumsum(0)])
            for index in by_key[key]:
                g = groups[index]
                lo = min(max(g.start - row, 0), values.shape[0])
                hi = min(max(g.stop - row, 0), values.shape[0])
                out[index, col : col + values.shape[1]] += prefix[hi] - prefix[lo]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out
