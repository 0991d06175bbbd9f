"""The rectangles of a table this rank holds, from either form a sharded state dict gives.

A DMP-sharded EBC's ``state_dict()`` gives each sharded table as a ``ShardedTensor``
or, when its ``ShardingEnv`` has ``output_dtensor=True`` (2-D parallel), as a ``DTensor``
whose local tensor is TorchRec's ``LocalShardsWrapper``. Either form may hold any number
of pieces of one table on one rank, each at a global ``(row, column)`` offset: row-wise
and table-row-wise give row slices (several ranks per table, uneven sizes), column-wise
gives column slices, grid gives row × column rectangles. Code that reads or writes
tables piece by piece goes through ``local_pieces`` and never assumes a piece starts at
row 0, holds whole rows, or is the only one of its table on this rank.

Example:
    >>> for row, col, values in local_pieces(torch.zeros(3, 4), counted_once=True):
    ...     print(row, col, tuple(values.shape))
    0 0 (3, 4)
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.shards_wrapper import LocalShardsWrapper


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a table sharded over ranks (not a plain or replicated tensor)."""
    return isinstance(tensor, (ShardedTensor, DTensor))


def local_pieces(tensor: torch.Tensor, counted_once: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(row offset, column offset, values)`` of each part of ``tensor`` on this rank.

    ``values`` alias the table (in-place edits reach the model). A tensor that is not
    sharded (unsharded model, data-parallel table) is yielded whole, at offset ``(0, 0)``,
    only if ``counted_once``.

    Raises:
        TypeError: a ``DTensor`` whose local tensor is not TorchRec's ``LocalShardsWrapper``
            (its pieces' offsets are not known), or one replicated over a mesh dimension
            (2-D parallel: sums over all ranks would count each replica).
    """
    if isinstance(tensor, ShardedTensor):
        for shard in tensor.local_shards():
            row, col = shard.metadata.shard_offsets
            yield row, col, shard.tensor
    elif isinstance(tensor, DTensor):
        replicated = [
            i for i, p in enumerate(tensor.placements) if p.is_replicate() and tensor.device_mesh.size(i) > 1
        ]
        if replicated:
            raise TypeError(f"a DTensor table replicated over mesh dimensions {replicated} is not supported")
        local = tensor.to_local()
        if not isinstance(local, LocalShardsWrapper):
            raise TypeError(f"a DTensor table must wrap TorchRec's LocalShardsWrapper, got {type(local).__name__}")
        for (row, col), values in zip(local.local_offsets(), local.local_shards()):
            yield int(row), int(col), values
    elif counted_once:
        yield 0, 0, tensor
