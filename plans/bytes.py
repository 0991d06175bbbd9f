"""Serving bytes of pruned embeddings, the denominator of the compression ratio (CR).

CR = unpruned embedding bytes ÷ pruned embedding bytes, counting everything needed at
serving (DESIGN.md, "Prune, repack, compression ratio"); MLP bytes are never included.

- Unpruned: every row at full width ``K`` in fp32: ``rows × K × 4``.
- Structured group of ``rows`` ids at ``width`` columns: the values ``rows × width × 4``
  and the first id of its range (int64, the key rewrite needs it; dropped groups too). A
  group whose ids share ``buckets`` rows (hashing) stores ``buckets`` rows and their count.
- The projection back to ``K``, once per feature (its groups use prefixes of one nested
  column order, ``sharding.repack``): for the feature's widest group's ``W`` columns,
  ``"selection"`` stores each one's model column (uint8, ``K ≤ 256``), ``"learned"``
  (NIS-ME) a ``W × K`` fp32 matrix (``plan_bytes``). ``group_bytes`` charges each group
  for a projection of its own width: an upper bound, linear in the widths, which NIS's
  reward budgets with (the knapsack counts the exact bytes, ``pipeline.prune.knapsack``).
- Fine-grained (paper eq. 9, COO as the paper reports it): per non-zero entry an fp32
  value, an int32 row index (local to its table: < 2^31 rows per field) and an int8
  column index (``K ≤ 128``): 9 bytes. scipy's default COO (int32 row and column) would
  be 12 bytes; the narrower column index is the honest minimum for ``K ≤ 128``.
- Quantized tables (``bits`` 8 or 4: TorchRec's row-wise INT8/INT4, FBGEMM's fused
  layout, as ``pipeline.inference.inference_tables`` builds them): per row the packed
  values ``ceil(width × bits / 8)`` plus an fp16 scale and an fp16 bias (4 bytes), rows
  padded to ``QUANT_ROW_ALIGNMENT`` bytes, each table's block padded to a 128-byte cache
  line: ``round_up(rows × round_up(ceil(width × bits / 8) + 4, align), 128)``. A repacked
  model's tables are its column slabs (``sharding.column_slabs``): per feature one table
  per pair of consecutive distinct widths, holding the rows of every group at least the
  wider one wide, so a row split over ``s`` slabs pays ``s`` scales and biases
  (``plan_bytes``; ``group_bytes`` prices one table per group). A table FBGEMM cannot
  quantize (``quantizes``: its width × bits not a multiple of 16, e.g. a width-1 slab at
  INT8) is served with fp32 rows in the same kernel: ``width × 4`` bytes a row, no
  scale or bias (at INT8 width 1 that is also the smaller row: 4 bytes against 5).
  Range starts and projections stay as above (they are not quantized).

Example:
    >>> group_bytes(rows=10, width=4, embedding_dim=64, projection="selection")
    172
    >>> plan_bytes(["a", "a"], rows=[10, 90], widths=[4, 2], embedding_dim=64, projection="selection")
    900
    >>> fine_grained_bytes(1000), nnz_for_cr(unpruned_bytes=90_000, target_cr=10.0)
    (9000, 1000)
    >>> quantized_table_bytes(rows=100, width=16, bits=8), quantized_table_bytes(100, 16, 4)
    (2048, 1280)
    >>> quantized_table_bytes(rows=200, width=1, bits=8)  # kept fp32: 800 B (not 1,000), one 896 B block
    896
    >>> plan_bytes(["a", "a"], rows=[10, 90], widths=[4, 2], embedding_dim=64, projection="selection", bits=8)
    788

    (the int8 one: slab ``a:0-2`` holds 100 rows of 2 + 4 bytes, 640 with padding, slab
    ``a:2-4`` 10 rows, 128; range starts 16, column indices 4.)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

PROJECTIONS = ("selection", "learned")
VALUE_BYTES = 4  # fp32
RANGE_START_BYTES = 8  # int64 first id of a group's range
SELECTION_INDEX_BYTES = 1  # uint8 column index per stored column
BUCKETS_BYTES = 8  # int64 row count of a group whose ids share rows (hashing)
COO_ENTRY_BYTES = 4 + 4 + 1  # fp32 value, int32 row, int8 column
QUANTIZED_BITS = (8, 4)
SCALE_BIAS_BYTES = 2 + 2  # fp16 scale and fp16 bias in front of each quantized row
QUANTIZED_WIDTH_BITS = 16  # FBGEMM's quantizer packs a row's values in whole fp16-sized units
# TorchRec pads quantized rows to 16 bytes by default (GPU loads); FBGEMM's own CPU
# tables use 1, and so does serving here: with 16 a width-4 INT4 row would take 16 bytes
# instead of 6. A test compares this accounting with FBGEMM's allocation.
QUANT_ROW_ALIGNMENT = 1
TABLE_ALIGNMENT = 128  # FBGEMM starts every table on a cache line


def group_bytes(rows, width, embedding_dim: int, projection: str, bits: Optional[int] = None):
    """Serving bytes of groups (scalars or numpy arrays of ``rows`` and ``width``):
    fp32 values, or ``bits``-bit quantized tables (``quantized_table_bytes``), each with a
    projection of its own width (an upper bound: ``plan_bytes`` is exact)."""
    rows, width = np.asarray(rows, dtype=np.int64), np.asarray(width, dtype=np.int64)
    total = RANGE_START_BYTES + width * projection_column_bytes(projection, embedding_dim) + _values(rows, width, bits)
    return int(total) if total.ndim == 0 else total


def plan_bytes(keys, rows, widths, embedding_dim: int, projection: str, bits: Optional[int] = None) -> int:
    """Exact serving bytes of groups of features ``keys``: values (quantized: per column
    slab), range starts per group, the projection once per feature at its widest group's width."""
    rows, widths = np.asarray(rows, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    keys = np.asarray(keys)
    values = _values(rows, widths, None).sum() if bits is None else 0
    projections = 0
    for key in dict.fromkeys(keys.tolist()):
        mine = keys == key
        distinct = np.unique(widths[mine][widths[mine] > 0])
        projections += int(distinct[-1]) if distinct.size else 0
        if bits is not None:  # a slab per pair of consecutive distinct widths
            for lo, hi in zip(np.concatenate([[0], distinct[:-1]]), distinct):
                values += quantized_table_bytes(rows[mine][widths[mine] >= hi].sum(), hi - lo, bits)
    return int(values + RANGE_START_BYTES * len(rows) + projections * projection_column_bytes(projection, embedding_dim))


def projection_column_bytes(projection: str, embedding_dim: int) -> int:
    """Bytes of one stored column's projection back to ``K``."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection {projection!r}; known: {PROJECTIONS}")
    return SELECTION_INDEX_BYTES if projection == "selection" else embedding_dim * VALUE_BYTES


def _values(rows: np.ndarray, width: np.ndarray, bits: Optional[int]):
    return rows * width * VALUE_BYTES if bits is None else quantized_table_bytes(rows, width, bits)


def quantizes(width, bits: int):
    """Whether FBGEMM quantizes a table ``width`` wide to ``bits`` (scalars or arrays):
    ``width × bits`` a multiple of 16 (even widths for INT8, multiples of 4 for INT4)."""
    return np.asarray(width) * bits % QUANTIZED_WIDTH_BITS == 0


def quantized_table_bytes(rows, width, bits: int):
    """Bytes FBGEMM allocates for tables of ``rows × width`` quantized row-wise to
    ``bits``, or kept fp32 where the width does not quantize (``quantizes``); scalars
    or numpy arrays; width 0 is no table: 0 bytes."""
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"bits {bits}; quantized tables have {QUANTIZED_BITS}")
    rows, width = np.asarray(rows, dtype=np.int64), np.asarray(width, dtype=np.int64)
    quantized = -(-width * bits // 8) + SCALE_BIAS_BYTES
    row = _round_up(np.where(quantizes(width, bits), quantized, width * VALUE_BYTES), QUANT_ROW_ALIGNMENT)
    total = np.where(width > 0, _round_up(rows * row, TABLE_ALIGNMENT), 0)
    return int(total) if total.ndim == 0 else total


def _round_up(n, multiple: int):
    return -(-n // multiple) * multiple


def unpruned_bytes(rows: int, embedding_dim: int) -> int:
    """Bytes of ``rows`` full-width fp32 rows."""
    return int(rows) * embedding_dim * VALUE_BYTES


def fine_grained_bytes(nnz: int) -> int:
    """COO bytes of ``nnz`` kept entries of Ẽ (eq. 9)."""
    return int(nnz) * COO_ENTRY_BYTES


def nnz_for_cr(unpruned_bytes: int, target_cr: float) -> int:
    """Most entries of Ẽ to keep so that their COO bytes stay within ``unpruned / target_cr``.

    Never more than the table has (``unpruned_bytes / 4``); ε is then the
    ``1 - nnz / entries`` quantile of ``|Ẽ|`` (see ``epsilon_quantile``).
    """
    if target_cr <= 0:
        raise ValueError(f"target CR must be > 0, got {target_cr}")
    budget = int(unpruned_bytes // target_cr)
    return min(budget // COO_ENTRY_BYTES, int(unpruned_bytes) // VALUE_BYTES)


def epsilon_quantile(unpruned_bytes: int, target_cr: float) -> float:
    """The quantile ``q`` of ``|Ẽ|`` whose value is ε for ``target_cr`` (entries ≥ ε are kept).

    Ties at ε keep a few more entries than ``nnz_for_cr``; the caller counts the actual
    non-zeros and reports the CR achieved.

    Example:
        >>> epsilon_quantile(unpruned_bytes=90_000, target_cr=10.0)  # keep 1000 of 22500
        0.9555555555555556
    """
    entries = int(unpruned_bytes) // VALUE_BYTES
    return 1.0 - nnz_for_cr(unpruned_bytes, target_cr) / entries
