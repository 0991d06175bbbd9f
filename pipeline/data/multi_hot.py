"""MLPerf DLRM-DCNv2's synthetic multi-hot Criteo (``data.multi_hot_sizes``): each row's
id of a categorical field becomes a bag of ids, the same bag for that id in every split,
stage and rank.

MLPerf (TorchRec's ``torchrec_dlrm``: ``--multi_hot_sizes``,
``--multi_hot_distribution_type``) expands Criteo 1TB's one id per field into a bag of
``size`` ids: the id itself and ``size - 1`` more, drawn once from a fixed seed, so a
bag depends on its id alone. Here a field of ``size`` s > 1 and ``n`` table rows draws
``s - 1`` offsets once, from a generator seeded by ``(0, field index)``, and id ``i``
becomes the bag ``i, (i + o_1) % n, ..., (i + o_{s-1}) % n``:

- ``uniform``: ``o_k`` uniform on ``[0, n)``, as TorchRec draws its extra ids;
- ``pareto``: ``o_k = ⌊X⌋ % n`` with ``X`` Lomax of shape 0.25 (numpy's ``pareto``, the
  shape TorchRec uses): mostly small offsets, so extra ids close to ``i``.

TorchRec draws the extra ids per id (an ``n × (s - 1)`` table, 40M × 99 ids for C21 at
MLPerf's sizes; ``pareto`` ids near 0 rather than near ``i``); offsets drawn per field
keep ``s - 1`` numbers whatever ``n``; what grows with ``n`` is the relabelling below,
4 bytes per row. Fields of size 1 stay single-hot.

The rows are then relabelled by how often the train split looks them up: the id the
model sees is the row's rank by expanded train count (ties by row), so ids stay
frequency ranks, and frequency blocks and prune groups stay id ranges. Relabelling is
a fixed permutation of a table's rows, whose rows all start from the same uniform init.

**Counts of a multi-hot field count lookups**: ``counts[key]`` (RLE by new id) gives
each row the train occurrences of every id whose bag holds it; a bag of ``s`` ids adds
``s`` lookups, so the field weighs ``s`` times its rows in the equal-mass blocking, the
prune's group mass and ``--min-row-lookups``.

Example:
    >>> hot = MultiHot({"C1": 3, "C2": 1}, "uniform", {"C1": 4, "C2": 2},
    ...                {"C1": [[5, 1], [2, 1], [1, 2]], "C2": [[1, 2]]})
    >>> hot.keys, hot.counts["C1"]   # 9 rows of 3 lookups: 27, by new id
    (('C1',), [[8, 2], [7, 1], [4, 1]])
    >>> hot.bags("C1", torch.tensor([0, 0, 3])).tolist()   # one bag per id, always the same
    [[0, 1, 2], [0, 1, 2], [1, 2, 3]]
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import MULTI_HOT_DISTRIBUTIONS
from pipeline.data.metadata import decode_counts, encode_counts

SEED = 0  # as TorchRec's np.random.seed(0): every rank and stage draws the same offsets
PARETO_SHAPE = 0.25  # TorchRec's np.random.pareto(a=0.25)


def draw_offsets(rng: np.random.Generator, distribution: str, count: int, rows: int) -> np.ndarray:
    """``count`` offsets in ``[0, rows)`` from ``distribution`` (``uniform`` or ``pareto``)."""
    if distribution == "uniform":
        return rng.integers(0, rows, count)
    if distribution == "pareto":
        return (np.floor(rng.pareto(PARETO_SHAPE, count)) % rows).astype(np.int64)
    raise ValueError(f"multi-hot distribution {distribution!r}: expected one of {MULTI_HOT_DISTRIBUTIONS}")


class MultiHot:
    """The bags of every multi-hot field and their lookup counts.

    Args:
        sizes: bag size per categorical field, in field order (the seeds follow it).
        distribution: ``uniform`` or ``pareto``.
        num_embeddings: table rows per field.
        counts: per field, RLE train counts by id (``DatasetMeta.id_counts``).
    """

    def __init__(
        self, sizes: Mapping[str, int], distribution: str, num_embeddings: Mapping[str, int],
        counts: Mapping[str, list[list[int]]],
    ) -> None:
        self.sizes = {key: size for key, size in sizes.items() if size > 1}
        self.keys = tuple(self.sizes)
        self.counts: dict[str, list[list[int]]] = {}
        self._offsets: dict[str, torch.Tensor] = {}
        self._relabel: dict[str, torch.Tensor] = {}
        for index, (key, size) in enumerate(sizes.items()):
            if size == 1:
                continue
            rows = num_embeddings[key]
            offsets = np.r_[0, draw_offsets(np.random.default_rng([SEED, index]), distribution, size - 1, rows)]
            single = decode_counts(counts[key])
            if single.size != rows:
                raise ValueError(f"{key}: counts of {single.size} ids for a table of {rows} rows")
            lookups = np.zeros(rows, dtype=np.int64)
            for o in offsets.tolist():  # row j is the o-th extra id of id (j - o) % rows
                lookups[o:] += single[: rows - o]
                lookups[:o] += single[rows - o :]
            order = np.argsort(-lookups, kind="stable")
            relabel = np.empty(rows, dtype=np.int32)  # ids are int32 in the shards: half the memory
            relabel[order] = np.arange(rows)
            self.counts[key] = encode_counts(lookups[order])
            self._offsets[key] = torch.from_numpy(offsets.astype(np.int64))
            self._relabel[key] = torch.from_numpy(relabel)

    def bags(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """``[B, size]``: the bag of each of ``ids`` ``[B]`` (frequency ranks of ``key``)."""
        relabel = self._relabel[key]
        return relabel[(ids.unsqueeze(1) + self._offsets[key]) % relabel.numel()].long()

    def kjt(
        self, keys: Sequence[str], ids: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> KeyedJaggedTensor:
        """The KJT of ids ``[F, B]`` of ``keys`` (and their weights): every multi-hot key's
        id replaced by its bag (each id of a bag keeps the row's weight), the others as they are."""
        bags = [self.bags(key, row) if key in self.sizes else row.unsqueeze(1) for key, row in zip(keys, ids)]
        batch = ids.shape[1]
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(keys),
            values=torch.cat([bag.reshape(-1) for bag in bags]),
            lengths=torch.cat([torch.full((batch,), bag.shape[1], dtype=torch.int32) for bag in bags]),
            weights=None if weights is None else torch.cat(
                [w.repeat_interleave(bag.shape[1]) for w, bag in zip(weights, bags)]
            ),
        )
