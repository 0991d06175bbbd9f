"""Which KJT keys a dataset feeds to the embedding tables, under each dense mode.

- ``embedding`` (the paper's): keys ``I1..I13`` then ``C1..C26`` in one *weighted* KJT.
  Each ``I`` key has a one-row table (id 0) whose weight is the transformed value, so
  α and blocking apply to numeric fields too; its train count is the number of rows
  where it is present. ``C`` keys carry weight 1.
- ``mlp`` (DLRM's): keys ``C1..C26``, unweighted; the dense values go to a bottom MLP.
- ``bucket``: keys ``C1..C26`` then ``B1..B13`` (bucketised integers), unweighted.

In every mode ``Batch.dense`` is the ``[B, 13]`` transformed integer fields. With
``data.multi_hot_sizes`` (``from_config``) the ``C`` keys of size > 1 carry bags of ids
(``pipeline.data.multi_hot``), and their counts count lookups.

Example:
    >>> layout = FeatureLayout.from_meta(DatasetMeta.load("runs/data/synthetic"), "embedding")
    ... # doctest: +SKIP
    >>> layout.keys[:2], layout.num_embeddings["I1"], layout.id_columns[:1]  # doctest: +SKIP
    (('I1', 'I2'), 1, ('C1',))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from pipeline.config import ConfigError, DataConfig
from pipeline.data.metadata import DatasetMeta
from pipeline.data.multi_hot import MultiHot
from pipeline.data.schema import DENSE_FIELDS, SPARSE_FIELDS

DENSE_MODES = ("embedding", "mlp", "bucket")


@dataclass(frozen=True)
class FeatureLayout:
    """The sparse features of a run, in KJT key order.

    Attributes:
        keys: KJT keys, in order (also the α-EBC field order).
        weighted: the KJT carries weights (``embedding`` mode).
        num_embeddings: rows of each key's table.
        counts: per key, RLE train counts by id (input of ``compute_blocking``).
        num_dense: width of ``Batch.dense`` (13).
        dense_mode: ``embedding``, ``mlp`` or ``bucket``.
        dense_keys: keys whose id is always 0 and whose weight is the dense value
            (the first ``len(dense_keys)`` keys; empty unless ``embedding``).
        id_columns: parquet columns holding the ids of the remaining keys, in key order.
        multi_hot: the bags of the multi-hot keys (``None``: every key single-hot).
    """

    keys: tuple[str, ...]
    weighted: bool
    num_embeddings: dict[str, int]
    counts: dict[str, list[list[int]]]
    num_dense: int
    dense_mode: str
    dense_keys: tuple[str, ...]
    id_columns: tuple[str, ...]
    multi_hot: Optional[MultiHot] = field(default=None, compare=False)

    @property
    def multi_hot_keys(self) -> tuple[str, ...]:
        """Keys whose bags hold several ids, in key order."""
        return self.multi_hot.keys if self.multi_hot is not None else ()

    @classmethod
    def from_config(cls, meta: DatasetMeta, data: DataConfig) -> "FeatureLayout":
        """The layout a run with ``data`` (its ``dense_mode`` and multi-hot sizes) trains on."""
        return cls.from_meta(meta, data.dense_mode, data.multi_hot_sizes, data.multi_hot_distribution)

    @classmethod
    def from_meta(
        cls, meta: DatasetMeta, dense_mode: str, multi_hot_sizes: Sequence[int] = (),
        multi_hot_distribution: str = "uniform",
    ) -> "FeatureLayout":
        """The layout of ``meta``'s dataset under ``dense_mode``, its categorical fields
        expanded to bags of ``multi_hot_sizes`` ids (one size per field; empty: single-hot).

        Raises:
            ConfigError: naming ``data.multi_hot_sizes`` when its length is not the number
                of categorical fields.
        """
        if dense_mode not in DENSE_MODES:
            raise ValueError(f"dense_mode {dense_mode!r}: expected one of {DENSE_MODES}")
        dense_keys = tuple(meta.dense_fields) if dense_mode == "embedding" else ()
        id_columns = tuple(meta.sparse_fields)
        if dense_mode == "bucket":
            if not meta.bucket_fields:
                raise ValueError("dense_mode bucket: the dataset has no bucket fields")
            id_columns += tuple(meta.bucket_fields)
        missing = [c for c in id_columns if c not in meta.vocab_sizes or c not in meta.id_counts]
        if missing:
            raise ValueError(f"metadata lacks vocab sizes or counts for {missing}")
        num_embeddings = {k: 1 for k in dense_keys}
        num_embeddings.update({c: meta.vocab_sizes[c] for c in id_columns})
        counts = {k: [[meta.dense_counts[k], 1]] for k in dense_keys}
        counts.update({c: meta.id_counts[c] for c in id_columns})
        if multi_hot_sizes and len(multi_hot_sizes) != len(meta.sparse_fields):
            raise ConfigError(
                f"data.multi_hot_sizes: {len(multi_hot_sizes)} sizes for the {len(meta.sparse_fields)} "
                f"categorical fields {meta.sparse_fields[0]}..{meta.sparse_fields[-1]}, one size each"
            )
        multi_hot = None
        if any(size > 1 for size in multi_hot_sizes):
            sizes = dict(zip(meta.sparse_fields, multi_hot_sizes))
            multi_hot = MultiHot(sizes, multi_hot_distribution, num_embeddings, counts)
            counts.update(multi_hot.counts)
        return cls(
            keys=dense_keys + id_columns,
            weighted=bool(dense_keys),
            num_embeddings=num_embeddings,
            counts=counts,
            num_dense=len(meta.dense_fields),
            dense_mode=dense_mode,
            dense_keys=dense_keys,
            id_columns=id_columns,
            multi_hot=multi_hot,
        )

    @classmethod
    def from_table_sizes(cls, table_sizes: Sequence[int], dense_mode: str) -> "FeatureLayout":
        """The layout of a Criteo-shaped dataset that is not on disk: ``C1..Cn`` with
        ``table_sizes`` rows (``data.table_sizes``), for planning only.

        Without train counts every id counts once, so blocking cuts equal id ranges;
        table shapes (all a planner needs) do not depend on the cuts.

        Example:
            >>> FeatureLayout.from_table_sizes([40, 3], "mlp").num_embeddings
            {'C1': 40, 'C2': 3}
        """
        if dense_mode not in ("embedding", "mlp"):
            raise ValueError(f"data.dense_mode {dense_mode!r}: data.table_sizes supports embedding or mlp")
        if len(table_sizes) > len(SPARSE_FIELDS) or min(table_sizes, default=0) < 1:
            raise ValueError(f"data.table_sizes: expected 1..{len(SPARSE_FIELDS)} positive sizes, got {list(table_sizes)}")
        dense_keys = DENSE_FIELDS if dense_mode == "embedding" else ()
        id_columns = SPARSE_FIELDS[: len(table_sizes)]
        num_embeddings = {k: 1 for k in dense_keys}
        num_embeddings.update(zip(id_columns, (int(n) for n in table_sizes)))
        return cls(
            keys=dense_keys + id_columns,
            weighted=bool(dense_keys),
            num_embeddings=num_embeddings,
            counts={k: [[1, n]] for k, n in num_embeddings.items()},
            num_dense=len(DENSE_FIELDS),
            dense_mode=dense_mode,
            dense_keys=dense_keys,
            id_columns=id_columns,
        )
