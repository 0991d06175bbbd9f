"""The unit the loader yields and every model consumes.

``Batch`` is a TorchRec ``Pipelineable``, so ``TrainPipelineSparseDist`` can move it to
the device and start the sparse input distribution of the next batch early.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One batch of rows.

    Attributes:
        dense: ``[B, 13]`` float32, transformed integer fields.
        sparse: ``KeyedJaggedTensor`` of categorical ids (frequency ranks), one key per
            feature; weighted when dense fields travel as weighted features.
        labels: ``[B]`` float32 in {0, 1}; ``-1`` marks padding rows (evaluation only).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
        )

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.labels.shape[0])


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Stack batches row-wise into one (keys must match); the KJT stays key-major.

    Used by the search loader: a train batch and a validation batch travel as one
    KJT, so the sharded EBC distributes its input once per step.

    Example:
        >>> a = Batch(torch.zeros(2, 1), KeyedJaggedTensor.from_lengths_sync(
        ...     ["f"], torch.tensor([1, 2]), torch.tensor([1, 1])), torch.zeros(2))
        >>> b = Batch(torch.ones(1, 1), KeyedJaggedTensor.from_lengths_sync(
        ...     ["f"], torch.tensor([3]), torch.tensor([1])), torch.ones(1))
        >>> concat_batches([a, b]).sparse["f"].values().tolist()
        [1, 2, 3]
    """
    keys = batches[0].sparse.keys()
    for b in batches[1:]:
        if b.sparse.keys() != keys:
            raise ValueError(f"cannot concat batches with keys {keys} and {b.sparse.keys()}")
    per_key = [b.sparse.to_dict() for b in batches]
    values, lengths, weights = [], [], []
    weighted = batches[0].sparse.weights_or_none() is not None
    for key in keys:
        for parts in per_key:
            jt = parts[key]
            values.append(jt.values())
            lengths.append(jt.lengths())
            if weighted:
                weights.append(jt.weights())
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weighted else None,
    )
    return Batch(
        dense=torch.cat([b.dense for b in batches]),
        sparse=sparse,
        labels=torch.cat([b.labels for b in batches]),
    )
