"""A tiny preprocessed dataset written straight to parquet, for loader tests.

Every row carries its identity: ``I1`` is a per-dataset unique row id (exact in
float32), so a test can map any batch row back to its source row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.metadata import DatasetMeta, encode_counts
from pipeline.data.schema import BUCKET_FIELDS, DENSE_FIELDS, LABEL, SPARSE_FIELDS

VOCAB = 50
BUCKETS = 20
SPLIT_FILES = {"train": (300, 200), "val": (150,), "test": (130,)}


def write_dataset(
    directory: str | Path, split_files: dict = SPLIT_FILES, row_group_rows: int = 64, seed: int = 0
) -> DatasetMeta:
    """Write shards of ``split_files[split]`` rows each (row groups of ``row_group_rows``) and metadata."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    files, rows, uid = {}, {}, 0
    counts = {c: np.zeros(VOCAB if c in SPARSE_FIELDS else BUCKETS, np.int64) for c in SPARSE_FIELDS + BUCKET_FIELDS}
    dense_counts = {c: 0 for c in DENSE_FIELDS}
    for split, sizes in split_files.items():
        (directory / split).mkdir(parents=True, exist_ok=True)
        files[split] = []
        for i, n in enumerate(sizes):
            cols = {LABEL: rng.integers(0, 2, n).astype(np.float32)}
            cols["I1"] = np.arange(uid, uid + n, dtype=np.float32)
            for c in DENSE_FIELDS[1:]:
                cols[c] = rng.random(n, dtype=np.float32) * 5
            for c in SPARSE_FIELDS:
                cols[c] = rng.integers(0, VOCAB, n).astype(np.int32)
            for c in BUCKET_FIELDS:
                cols[c] = rng.integers(0, BUCKETS, n).astype(np.int32)
            uid += n
            name = f"{split}/part-{i}.parquet"
            pq.write_table(pa.table(cols), directory / name, row_group_size=row_group_rows)
            files[split].append(name)
            if split == "train":
                for c in counts:
                    counts[c] += np.bincount(cols[c], minlength=len(counts[c]))
                for c in DENSE_FIELDS:
                    dense_counts[c] += int((cols[c] > 0).sum())
        rows[split] = sum(sizes)
    meta = DatasetMeta(
        dataset="synthetic", dense_fields=list(DENSE_FIELDS), sparse_fields=list(SPARSE_FIELDS),
        bucket_fields=list(BUCKET_FIELDS), vocab_sizes={c: len(v) for c, v in counts.items()},
        oov_ids={c: 0 for c in counts},
        # The fixture's ids are not frequency ranks; blocking only needs non-increasing counts.
        id_counts={c: encode_counts(np.sort(v)[::-1]) for c, v in counts.items()},
        dense_counts=dense_counts, min_count=1, split={"rule": "fixture"}, rows=rows, files=files,
    )
    meta.save(directory)
    return meta


def read_split(directory: str | Path, split: str) -> dict[str, np.ndarray]:
    """All columns of ``split``, rows in file order."""
    meta = DatasetMeta.load(directory)
    table = pa.concat_tables([pq.read_table(Path(directory) / f) for f in meta.files[split]])
    return {name: table.column(name).to_numpy() for name in table.column_names}
