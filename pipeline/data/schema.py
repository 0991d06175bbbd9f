"""Criteo row layout and the columns of the preprocessed parquet shards.

Raw row: ``label \\t I1..I13 \\t C1..C26`` (40 tab-separated fields). Integers may be
empty or negative; categoricals are 8 hex chars or empty.

Parquet shards (one per input chunk and split) hold:

- ``label``: float32, 0 or 1;
- ``I1..I13``: float32, ``log(1 + max(x, 0))``, missing -> 0;
- ``C1..C26``: int32 frequency ranks (0 = most frequent on the train split; missing and
  rare values share the field's OOV id, ranked by its combined count);
- ``B1..B13``: int32 frequency ranks of the bucketised integer fields (``bucket_key``),
  used by ``dense_mode=bucket``.
"""

from __future__ import annotations

import numpy as np

NUM_DENSE = 13
NUM_SPARSE = 26
LABEL = "label"
DENSE_FIELDS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
SPARSE_FIELDS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
BUCKET_FIELDS: tuple[str, ...] = tuple(f"B{i}" for i in range(1, NUM_DENSE + 1))
RAW_COLUMNS: tuple[str, ...] = (LABEL,) + DENSE_FIELDS + SPARSE_FIELDS
SPLITS: tuple[str, ...] = ("train", "val", "test")


def dense_transform(x: np.ndarray) -> np.ndarray:
    """``log(1 + max(x, 0))`` as float32; the paper's and DLRM's dense transform."""
    return np.log1p(np.maximum(x, 0)).astype(np.float32)


def bucket_key(x: np.ndarray) -> np.ndarray:
    """Integer bucket of a raw integer field (the Criteo-winners' rule).

    Values below 3 (negatives included) keep their own bucket; larger values go to
    ``3 + floor(ln(x)^2)``, so bucket widths grow with the value.

    >>> bucket_key(np.array([-2, 0, 2, 3, 100, 10**6])).tolist()
    [-2, 0, 2, 4, 24, 193]
    """
    x = np.asarray(x, dtype=np.int64)
    big = x >= 3
    out = x.copy()
    out[big] = 3 + np.floor(np.log(x[big].astype(np.float64)) ** 2).astype(np.int64)
    return out
