"""``metadata.json`` of a preprocessed dataset: fields, vocab sizes, train counts, splits.

The per-id train counts are stored run-length encoded: ids are frequency ranks, so
the counts are non-increasing in the id and long runs of equal counts (the long
tail of ones, twos, ...) collapse to a few pairs.

Example:
    >>> rle = encode_counts(np.array([9, 5, 5, 1, 1, 1]))
    >>> rle
    [[9, 1], [5, 2], [1, 3]]
    >>> decode_counts(rle).tolist()
    [9, 5, 5, 1, 1, 1]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


def encode_counts(counts: np.ndarray) -> list[list[int]]:
    """Run-length encode a count vector as ``[[count, run_length], ...]``."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, counts[1:] != counts[:-1]])
    runs = np.diff(np.r_[starts, counts.size])
    return [[int(c), int(r)] for c, r in zip(counts[starts], runs)]


def decode_counts(rle: list[list[int]]) -> np.ndarray:
    """Inverse of ``encode_counts``."""
    if not rle:
        return np.zeros(0, dtype=np.int64)
    values, runs = np.asarray(rle, dtype=np.int64).T
    return np.repeat(values, runs)


@dataclass(frozen=True)
class DatasetMeta:
    """Everything later stages need to know about a preprocessed dataset.

    Attributes:
        dataset: ``criteo_kaggle``, ``criteo_1tb`` or ``synthetic``.
        dense_fields / sparse_fields / bucket_fields: column names in the shards.
        vocab_sizes: ids per categorical (sparse and bucket) field, OOV included.
        oov_ids: the shared id of missing and rare values, per field.
        id_counts: per field, RLE of train-split counts indexed by id (non-increasing).
        dense_counts: per dense field, train rows where the value is present.
        min_count: values seen fewer times on the train split map to OOV.
        split: the split rule, e.g. ``{"rule": "hash", "seed": 0, "ratios": [8, 1, 1]}``.
        rows: ``read``, ``rejected``, and one count per split.
        files: per split, shard paths relative to the dataset directory, in row order (one
            chunk's rows of a split may take several files, ``<chunk>.part<k>.parquet``).
        sources: per input file: name, bytes, mtime, checksum.
        versions: library versions that wrote the dataset.
        distinct_values: per ``C*`` and ``B*`` field, distinct values seen on the train split
            (missing excluded), before ``min_count`` folds the rare ones into OOV.
        options: the preprocessing options (a re-run with equal options is a no-op).
        row_group_rows: rows per parquet row group (at most) as written: ``options``'
            ``row_group_rows``, or fewer where ``--memory-mb`` could not buffer one per split
            (0: written before this was recorded).
    """

    dataset: str
    dense_fields: list[str]
    sparse_fields: list[str]
    bucket_fields: list[str]
    vocab_sizes: dict[str, int]
    oov_ids: dict[str, int]
    id_counts: dict[str, list[list[int]]]
    dense_counts: dict[str, int]
    min_count: int
    split: dict[str, Any]
    rows: dict[str, int]
    files: dict[str, list[str]]
    sources: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    distinct_values: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    row_group_rows: int = 0
    format_version: int = FORMAT_VERSION

    def counts(self, name: str) -> np.ndarray:
        """Train counts indexed by id for a categorical field."""
        return decode_counts(self.id_counts[name])

    def save(self, directory: str | Path) -> None:
        """Write ``metadata.json`` atomically; its presence marks the dataset complete."""
        path = Path(directory) / METADATA_FILE
        tmp = path.with_name(path.name + ".tmp")
        # fields are plain JSON values: no need for asdict's deep copy (~0.3 s on Criteo's counts)
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetMeta":
        """Read ``metadata.json`` from a dataset directory."""
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no metadata.json; is {directory} a finished dnis-preprocess output?"
            )
        doc = json.loads(path.read_text())
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {doc.get('format_version')} != {FORMAT_VERSION}")
        return cls(**doc)
