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
from itertools import accumulate
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from plans.structured import Group
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


def indices_by_key(groups: Sequence[Group]) -> dict[str, list[int]]:
    """Per feature key, the indices of its groups in ``groups``."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        by_key[group.key].append(index)
    return by_key


def group_rows(group: Group, row: int, rows: int) -> tuple[int, int]:
    """Local ``[lo, hi)`` of ``group``'s ids in a piece of ``rows`` rows starting at id ``row``."""
    return min(max(group.start - row, 0), rows), min(max(group.stop - row, 0), rows)


def group_sum_sq(model: nn.Module, groups: Sequence[Group], embedding_dim: int) -> torch.Tensor:
    """``[len(groups), K]``: per group, ``Σ_{id in [start, stop)} E[id, j]²`` (float64).

    ``model`` holds one table ``t_<key>`` per feature (an α-EBC or plain EBC, sharded
    by ``DistributedModelParallel`` or not). Replicated tables are counted on rank 0.
    """
    by_key = indices_by_key(groups)
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


def group_gram(model: nn.Module, groups: Sequence[Group], embedding_dim: int) -> torch.Tensor:
    """``[len(groups), K, K]``: per group, ``Σ_{id in [start, stop)} E[id]ᵀ E[id]`` (float64).

    Cross-column terms need whole rows: a rank's pieces of one table are put side by
    side per row range (a column-wise table on one rank, several pieces); pieces of a
    row range whose other columns sit on another rank raise ``ValueError`` naming the
    table (load the run on fewer ranks: checkpoints load on any world size).
    """
    by_key = indices_by_key(groups)
    out = torch.zeros(len(groups), embedding_dim, embedding_dim, dtype=torch.float64)
    refused = ""
    try:
        for key, tensor in feature_tables(model, list(by_key)).items():
            for row, values in whole_rows(key, local_pieces(tensor, counted_once=is_rank0()), embedding_dim):
                for index in by_key[key]:
                    lo, hi = group_rows(groups[index], row, values.shape[0])
                    if hi > lo:
                        rows = values[lo:hi].detach().double()
                        out[index] += (rows.T @ rows).cpu()
    except ValueError as error:  # every rank learns of it below (none waits in the sum for the others)
        refused = str(error)
    if all_reduce_sum(torch.tensor([float(bool(refused))])).item():
        raise ValueError(refused or "another rank holds pieces of a table's rows, not whole rows; "
                         "prune on fewer ranks (--nproc 1)")
    return all_reduce_sum(out)


def whole_rows(key: str, pieces, embedding_dim: int) -> list[tuple[int, torch.Tensor]]:
    """``(row offset, [rows, K])`` per row range of ``pieces``, their columns side by side.

    Raises:
        ValueError: when this rank's pieces of a row range do not cover all ``K`` columns.
    """
    ranges: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for row, col, values in pieces:
        ranges[(row, values.shape[0])].append((col, values))
    out = []
    for (row, _), parts in sorted(ranges.items()):
        parts.sort(key=lambda part: part[0])
        if [c for c, _ in parts] != list(accumulate([0] + [v.shape[1] for _, v in parts[:-1]])) \
                or sum(v.shape[1] for _, v in parts) != embedding_dim:
            raise ValueError(f"table {table_name(key)}: this rank holds columns {[c for c, _ in parts]} of rows "
                             f"from {row}, not whole rows; prune on fewer ranks (--nproc 1)")
        out.append((row, parts[0][1] if len(parts) == 1 else torch.cat([v for _, v in parts], dim=1)))
    return out


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
