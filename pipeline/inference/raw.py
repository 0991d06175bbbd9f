"""Raw Criteo rows for scoring: TSV (plain or gzip, with or without the label column) or
parquet with the raw columns, decoded into ``ParsedBlock``s by the same code the
preprocessing uses, so serving reads exactly what training read.

A bad row is an error naming the file, the line (TSV) or row (parquet) and the field:
scoring never skips rows silently.

Example:
    >>> for first_line, block in read_tsv("day_23.gz"):   # doctest: +SKIP
    ...     scores = model.predict(block)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.criteo_reader import ParsedBlock, iter_blocks, parse_block, plan_chunks
from pipeline.data.schema import DENSE_FIELDS, LABEL, NUM_DENSE, NUM_SPARSE, RAW_COLUMNS, SPARSE_FIELDS
from pipeline.data.vocab import parse_hex

BLOCK_BYTES = 1 << 22


class RawInputError(ValueError):
    """A row that cannot be scored: ``path:line: field F: reason``."""


def has_label(path: str) -> bool:
    """40 tab-separated fields: labelled; 39: Criteo's unlabelled test format."""
    chunk = plan_chunks([path], chunk_bytes=1 << 62)[0]
    head = next(iter_blocks(chunk, block_bytes=1 << 16), (0, b""))[1]
    if not head:
        raise RawInputError(f"{path}: no rows (empty file)")
    fields = head.split(b"\n", 1)[0].count(b"\t") + 1
    if fields not in (len(RAW_COLUMNS), len(RAW_COLUMNS) - 1):
        raise RawInputError(f"{path}:1: field row: {fields} fields, expected {len(RAW_COLUMNS)} (or 39 without label)")
    return fields == len(RAW_COLUMNS)


def read_tsv(path: str | Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, ParsedBlock]]:
    """Yield ``(number of the block's first line, block)``; unlabelled rows get label 0."""
    path = str(path)
    labelled = has_label(path)
    lines_before = 0
    for chunk in plan_chunks([path], chunk_bytes=1 << 62):
        for _, data in iter_blocks(chunk, block_bytes):
            if not labelled:  # a placeholder label keeps one parser for both formats
                data = b"0\t" + data.replace(b"\n", b"\n0\t")
                data = data[:-2] if data.endswith(b"\n0\t") else data
            block = parse_block(data)
            if block.rejects:
                line, field, reason = block.rejects[0]
                raise RawInputError(f"{path}:{lines_before + line + 1}: field {field}: {reason}")
            yield lines_before + 1, block
            lines_before += block.num_lines


def read_parquet(path: str | Path, batch_rows: int = 65536) -> Iterator[tuple[int, ParsedBlock]]:
    """Yield ``(number of the block's first row, block)`` of a parquet file with columns
    ``I1..I13`` (integers, null = missing), ``C1..C26`` (8 hex chars, null or empty =
    missing) and optionally ``label``."""
    path = str(path)
    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    missing = [c for c in (*DENSE_FIELDS, *SPARSE_FIELDS) if c not in names]
    if missing:
        raise RawInputError(f"{path}: no column(s) {missing}")
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        yield row + 1, _parquet_block(path, row, pa.Table.from_batches([batch]))
        row += batch.num_rows


def _parquet_block(path: str, row: int, table: pa.Table) -> ParsedBlock:
    n = table.num_rows
    dense = np.zeros((n, NUM_DENSE), np.int64)
    dense_missing = np.zeros((n, NUM_DENSE), bool)
    for j, field in enumerate(DENSE_FIELDS):
        column = table.column(field).combine_chunks()
        if not pa.types.is_integer(column.type):
            raise RawInputError(f"{path}: field {field}: type {column.type}, expected integers")
        dense_missing[:, j] = column.is_null().to_numpy(zero_copy_only=False)
        dense[:, j] = column.fill_null(0).to_numpy()
    sparse = np.zeros((n, NUM_SPARSE), np.uint32)
    sparse_missing = np.zeros((n, NUM_SPARSE), bool)
    for j, field in enumerate(SPARSE_FIELDS):
        values = table.column(field).to_pylist()
        try:
            sparse[:, j], sparse_missing[:, j] = parse_hex(values)
        except ValueError:
            bad = next(i for i, v in enumerate(values) if not _is_hex(v))
            raise RawInputError(f"{path}:{row + bad + 1}: field {field}: not 8 hex chars: {values[bad]!r}") from None
    label = np.zeros(n, np.float32)
    if LABEL in table.column_names:
        label = table.column(LABEL).fill_null(-1).to_numpy().astype(np.float32)
    return ParsedBlock.from_arrays(label, dense, dense_missing, sparse, sparse_missing)


def _is_hex(value) -> bool:
    try:
        parse_hex([value])
    except ValueError:
        return False
    return True


def read_raw(path: str | Path) -> Iterator[tuple[int, ParsedBlock]]:
    """``read_parquet`` for ``*.parquet``, else ``read_tsv``."""
    return read_parquet(path) if str(path).endswith(".parquet") else read_tsv(path)
