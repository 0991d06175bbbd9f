"""The two passes over one chunk, as worker-process functions writing into the work dir.

Pass 1 (``count_chunk``) parses and validates every row, counts the train split's values
per field in runs ``_work/counts/<chunk>/<run>.{keys,counts}.npy`` (``count_runs``: a
chunk's counts spill to disk past a share of the memory budget), then writes
``_work/rejects/<chunk>.tsv`` (line numbers local to the chunk), ``_work/coded/<chunk>.npy``
(the good rows' splits, labels and dictionary codes, so that pass 2 never parses text
again) and last ``_work/counts/<chunk>.npz`` (the runs' sizes; row, missing and dense
counts). Pass 2 (``write_chunk``) maps each block's dictionary entries to ids with the
vocabulary (in slices of ``vocab_slice_keys`` entries when the whole vocabulary is larger,
so that the mapped pages it keeps stay within the budget) and writes per split the files
``<split>/<chunk>.part<k>.parquet``, k = 00000, 00001, ..., in row groups of
``row_group_rows`` (buffered: one per split) and ``file_row_groups`` row groups a file
(a parquet writer holds each row group's footer metadata until it closes the file), then
``_work/shards/<chunk>.json`` (per split its files and rows, the row-group size), then
drops the coded file. Every file appears by rename, so a killed run leaves finished
chunks reusable and nothing half-written under its final name (a chunk recounted after a
kill starts by dropping the runs it had spilled, a chunk rewritten by dropping the files
it had renamed).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.count_runs import CountRuns
from pipeline.data.criteo_reader import (
    TRAIN, Chunk, ParsedBlock, StreamError, assign_splits, count_lines_before, iter_blocks,
    parse_block,
)
from pipeline.data.schema import (
    BUCKET_FIELDS, DENSE_FIELDS, LABEL, NUM_DENSE, SPARSE_FIELDS, SPLITS, bucket_key,
    dense_transform,
)
from pipeline.data.vocab import INDEX_FILE, MISSING_BUCKET, Vocabulary
from pipeline.data.workers import release_freed_memory

SHARD_SCHEMA = pa.schema(
    [(LABEL, pa.float32())]
    + [(f, pa.float32()) for f in DENSE_FIELDS]
    + [(f, pa.int32()) for f in SPARSE_FIELDS + BUCKET_FIELDS]
)
SHARD_ROW_BYTES = sum(f.type.bit_width for f in SHARD_SCHEMA) // 8  # 212: a buffered row
RAW_ROW_CHARS = 200  # raw row text kept in rejects.tsv
# What a parquet writer holds per row group until it closes the file: the footer's
# metadata, ~830 B per column chunk (44.4 KiB for SHARD_SCHEMA's 53 columns, measured with
# pyarrow 26, and the same without statistics, page index or compression: what the writer
# builds, not what it serializes, 5.0 KiB a row group on disk, 3.4 without statistics).
# Pass 2 closes a file every ``file_row_groups`` row groups to bound it.
FOOTER_ROW_GROUP_BYTES = 45 << 10
# A shard writer hands freed memory back after this many row groups: pass 2's heap otherwise
# creeps up with the rows, row groups' footer metadata (~44 KiB each) staying allocated
# among freed pieces (pass 2 alone, 5M / 10M rows: 203 / 214-223 MiB without, 199 /
# 199-204 with, for at most 3% more CPU; after every row group: 185 MiB, 9% more CPU).
RELEASE_ROW_GROUPS = 16


class BadRowError(ValueError):
    """A bad row under ``--strict``; the message names file, line and field."""


@dataclass(frozen=True)
class ChunkContext:
    """What a worker needs besides the chunk (picklable, small)."""

    output: str
    dataset: str
    seed: int
    strict: bool
    block_bytes: int
    count_keys: int  # pass 1 spills a run of counts past this many held entries
    row_group_rows: int  # pass 2: rows per row group (--row-group-rows, or fewer for the budget)
    vocab_slice_keys: int  # pass 2: vocabulary entries per lookup slice
    file_row_groups: int  # pass 2: row groups per shard file (its writer holds their footer)

    @property
    def work(self) -> Path:
        return Path(self.output) / "_work"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def counts_path(ctx: ChunkContext, chunk: Chunk) -> Path:
    return ctx.work / "counts" / f"{chunk.id}.npz"


def rejects_path(ctx: ChunkContext, chunk: Chunk) -> Path:
    return ctx.work / "rejects" / f"{chunk.id}.tsv"


def shard_marker(ctx: ChunkContext, chunk: Chunk) -> Path:
    return ctx.work / "shards" / f"{chunk.id}.json"


def shard_file(split: str, chunk: Chunk, part: int) -> str:
    """Path of the ``part``-th shard file of ``chunk``'s ``split`` rows, relative to the
    dataset directory; parts hold consecutive rows, and sort by name as by row."""
    return f"{split}/{chunk.id}.part{part:05d}.parquet"


def chunk_files(directory: Path, split: str, chunk: Chunk) -> list[Path]:
    """Whatever shard files of ``chunk``'s ``split`` rows exist, finished or temporary
    (``<chunk>.parquet`` too: written before files had parts)."""
    split_dir = directory / split
    if not split_dir.is_dir():
        return []
    pattern = re.compile(re.escape(chunk.id) + r"(\.part\d{5,})?\.parquet(\.tmp)?")
    return sorted(p for p in split_dir.iterdir() if pattern.fullmatch(p.name))


def coded_path(ctx: ChunkContext, chunk: Chunk) -> Path:
    return ctx.work / "coded" / f"{chunk.id}.npy"


def _blocks(chunk: Chunk, ctx: ChunkContext):
    """``(block offset, first line index in chunk, parsed block, raw bytes)``, then a
    final ``(offset, line, None, reason)`` if a gzip stream breaks."""
    line = 0
    try:
        for offset, data in iter_blocks(chunk, ctx.block_bytes):
            block = parse_block(data)
            yield offset, line, block, data
            line += block.num_lines
    except StreamError as err:
        yield err.offset, line, None, err.reason


def save_coded(f, splits: np.ndarray, block: ParsedBlock) -> None:
    """Append a block's good rows (split, label, codes, dictionaries) to an open file; the
    dictionaries go back to back (a few np.save calls per block, not one per column)."""
    sizes = np.array([v.size for v in block.values], dtype=np.int64)
    for array in (splits, block.label, block.codes, sizes, np.concatenate(block.values),
                  np.concatenate(block.absent)):
        np.save(f, array, allow_pickle=False)


def load_coded(path: Path):
    """Yield ``(splits, block)`` as ``save_coded`` appended them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        while f.tell() < size:
            splits, label, codes, sizes, values, absent = (np.load(f) for _ in range(6))
            cuts = np.cumsum(sizes)[:-1]
            yield splits, ParsedBlock(np.zeros(0, np.int64), np.arange(label.size), label, codes,
                                      np.split(values, cuts), np.split(absent, cuts))


def escape_raw(raw: bytes) -> str:
    r"""Printable ASCII for a raw row: tabs, control bytes, non-ASCII and backslashes escaped,
    so a reject record holds no separator; ``unicode_escape`` decoding reverses it.

    >>> print(escape_raw(b"1\t\x0b\xff\\"))
    1\t\x0b\xff\\
    """
    return raw.decode("latin-1").encode("unicode_escape").decode("ascii")


def _raw_line(block: ParsedBlock, data: bytes, line: int) -> str:
    end = data.find(b"\n", block.line_starts[line])
    return escape_raw(data[block.line_starts[line] : end if end >= 0 else len(data)][:RAW_ROW_CHARS])


def _strict_error(chunk: Chunk, local_line: int, field: str, reason: str, raw: str) -> BadRowError:
    before = 0 if chunk.compressed else count_lines_before(chunk.path, chunk.start)
    return BadRowError(f"{chunk.path}:{before + local_line + 1}: field {field}: {reason}: {raw}")


def count_chunk(chunk: Chunk, ctx: ChunkContext) -> str:
    """Pass 1 over ``chunk``: validate rows, count train values, keep the coded rows;
    returns the chunk id."""
    runs = CountRuns(ctx.work, chunk.id, len(SPARSE_FIELDS + BUCKET_FIELDS), ctx.count_keys)
    missing = np.zeros(len(SPARSE_FIELDS), dtype=np.int64)
    dense_counts = np.zeros(NUM_DENSE, dtype=np.int64)
    rows = np.zeros((len(SPLITS), 2), dtype=np.int64)  # per split: read, rejected
    lines, crc, rejects = 0, 0, []
    coded_tmp = coded_path(ctx, chunk).with_suffix(".tmp")
    with open(coded_tmp, "wb") as coded:
        for offset, first_line, block, data in _blocks(chunk, ctx):
            if block is None:  # broken gzip: the partial line at the break is one bad row
                split = assign_splits(ctx.dataset, ctx.seed, chunk.name, np.array([offset]))[0]
                rows[split] += 1
                rejects.append((first_line, "row", data, ""))
                if ctx.strict:
                    raise _strict_error(chunk, first_line, "row", data, "")
                lines = first_line + 1
                break
            crc = zlib.crc32(data, crc)
            lines = first_line + block.num_lines
            bad_lines = np.array([r[0] for r in block.rejects], dtype=np.int64)
            if block.rejects:
                line, field, reason = block.rejects[0]
                if ctx.strict:
                    raise _strict_error(chunk, first_line + line, field, reason, _raw_line(block, data, line))
                rejects += [(first_line + ln, f, r, _raw_line(block, data, ln)) for ln, f, r in block.rejects]
            all_splits = assign_splits(ctx.dataset, ctx.seed, chunk.name, offset + block.line_starts)
            np.add.at(rows[:, 0], all_splits, 1)
            np.add.at(rows[:, 1], all_splits[bad_lines], 1)
            splits = all_splits[block.rows]
            save_coded(coded, splits, block)
            missing += _count_block(block, splits == TRAIN, runs, dense_counts)
    text = "".join(f"{line + 1}\t{field}\t{reason}\t{raw}\n" for line, field, reason, raw in rejects)
    atomic_write_bytes(rejects_path(ctx, chunk), text.encode())
    os.replace(coded_tmp, coded_path(ctx, chunk))
    tmp = counts_path(ctx, chunk).with_suffix(".tmp.npz")
    np.savez(tmp, missing=missing, dense_counts=dense_counts, rows=rows, lines=np.int64(lines),
             crc32=np.int64(crc), **runs.close())
    os.replace(tmp, counts_path(ctx, chunk))  # last: its presence marks the chunk counted
    return chunk.id


def _count_block(block: ParsedBlock, train: np.ndarray, runs: CountRuns, dense_counts: np.ndarray) -> np.ndarray:
    """Add a block's train rows to the counts (``C*`` then ``B*`` fields) and
    ``dense_counts``; returns the train rows missing each ``C*`` field."""
    missing = np.zeros(len(SPARSE_FIELDS), dtype=np.int64)
    for c in range(block.codes.shape[0]):
        counts = np.bincount(block.codes[c][train], minlength=block.values[c].size)
        absent = block.absent[c]
        if c < NUM_DENSE:
            dense_counts[c] += counts[~absent].sum()
            seen = counts > 0
            runs.add(len(SPARSE_FIELDS) + c, bucket_keys(block.values[c], absent)[seen], counts[seen])
        else:
            missing[c - NUM_DENSE] = counts[absent].sum()
            seen = (counts > 0) & ~absent
            runs.add(c - NUM_DENSE, block.values[c][seen], counts[seen])
    return missing


def bucket_keys(dense: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Bucket keys of raw integers; a missing integer is its own key."""
    return np.where(missing, MISSING_BUCKET, bucket_key(dense))


_VOCABS: dict[tuple, Vocabulary] = {}


def _vocabulary(output: str) -> Vocabulary:
    """The dataset's vocabulary, memory-mapped once per process (and again when a new run
    on the same output wrote another one: workers outlive a stage)."""
    index = os.stat(Path(output) / "vocab" / INDEX_FILE)
    key = (output, index.st_ino, index.st_mtime_ns)
    if key not in _VOCABS:
        _VOCABS.clear()
        _VOCABS[key] = Vocabulary.load(Path(output) / "vocab")
    return _VOCABS[key]


def column_entries(block: ParsedBlock, vocab: Vocabulary, column: str, slice_keys: int = 0) -> np.ndarray:
    """Shard column ``column``'s value for each of the block's dictionary entries: an
    integer transformed, a categorical or bucket key looked up once (``FieldVocab.ids_of``,
    in slices of ``slice_keys`` entries)."""
    code = _CODE_COLUMN[column]
    if column in DENSE_FIELDS:  # an empty integer's entry is 0, which maps to 0
        return dense_transform(block.values[code])
    if column in SPARSE_FIELDS:
        return vocab.fields[column].ids_of(block.values[code], block.absent[code], slice_keys)
    return vocab.fields[column].ids_of(bucket_keys(block.values[code], block.absent[code]), slice_keys=slice_keys)


def entry_values(block: ParsedBlock, vocab: Vocabulary, slice_keys: int = 0) -> list[np.ndarray]:
    """``column_entries`` of every shard column after the label."""
    return [column_entries(block, vocab, column, slice_keys) for column in SHARD_SCHEMA.names[1:]]


# the code column (I1..I13 then C1..C26) each shard column after the label is gathered by
_CODE_COLUMN = {
    **{f: j for j, f in enumerate(DENSE_FIELDS)}, **{f: NUM_DENSE + j for j, f in enumerate(SPARSE_FIELDS)},
    **{f: j for j, f in enumerate(BUCKET_FIELDS)},
}


def shard_table(block: ParsedBlock, entries: list[np.ndarray], rows=slice(None)) -> pa.Table:
    """The shard columns of the block's good rows ``rows`` (a slice or indices): the
    ``entry_values`` gathered by the rows' codes."""
    columns = [block.label[rows]] + [v[block.codes[_CODE_COLUMN[c]][rows]]
                                     for v, c in zip(entries, SHARD_SCHEMA.names[1:])]
    return pa.table(dict(zip(SHARD_SCHEMA.names, columns)), schema=SHARD_SCHEMA)


def encode_columns(block: ParsedBlock, vocab: Vocabulary, columns: Sequence[str]) -> list[np.ndarray]:
    """The shard columns ``columns`` of all the block's good rows, as ``shard_table``
    writes them: serving encodes raw rows so, only the columns its model reads and
    without building a table (one row: 0.85 -> 0.35 ms; the table and reading it back
    were 0.40 ms; 4096 rows: 6.0 -> 4.4 ms)."""
    return [column_entries(block, vocab, c)[block.codes[_CODE_COLUMN[c]]] for c in columns]


class ShardWriter:
    """Writes one chunk's rows of one split in row groups of exactly ``row_group_rows``
    (the last one shorter), ``file_row_groups`` of them per file: each file goes to a temp
    name and is renamed when it is closed, full or on ``close``; writes nothing when no
    row came. A parquet writer keeps every row group's footer metadata until it closes
    its file, so what it holds is bounded by ``file_row_groups``, not by the rows.
    ``write`` takes at most ``room`` rows, so a table never straddles two row groups and
    its memory is freed with the row group it went to."""

    def __init__(self, directory: Path, split: str, chunk: Chunk, row_group_rows: int, file_row_groups: int):
        self.directory, self.split, self.chunk = directory, split, chunk
        self.row_group_rows, self.file_row_groups = row_group_rows, file_row_groups
        self.buffer: list[pa.Table] = []
        self.buffered = self.rows = self.row_groups = 0
        self.files: list[tuple[str, int]] = []  # (path relative to directory, rows), closed ones
        self.writer: pq.ParquetWriter | None = None
        self.file_rows = 0

    @property
    def room(self) -> int:
        """Rows until the row group being buffered is full."""
        return self.row_group_rows - self.buffered

    def write(self, table: pa.Table) -> None:
        if table.num_rows > self.room:
            raise ValueError(f"{table.num_rows} rows for a row group with room for {self.room}")
        self.buffer.append(table)
        self.buffered += table.num_rows
        self.rows += table.num_rows
        if not self.room:
            self._flush()

    def close(self) -> list[tuple[str, int]]:
        """Flush and close; the files written, in row order, with their rows."""
        if self.buffered:
            self._flush()
        self._close_file()
        return self.files

    def _path(self) -> Path:
        return self.directory / shard_file(self.split, self.chunk, len(self.files))

    def _flush(self) -> None:
        if self.writer is None:
            path = self._path()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path.with_name(path.name + ".tmp"), SHARD_SCHEMA)
        # no combine_chunks: it would copy the row group
        self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=self.buffered)
        self.file_rows += self.buffered
        self.buffer, self.buffered = [], 0
        self.row_groups += 1
        if self.row_groups % self.file_row_groups == 0:
            self._close_file()
        if self.row_groups % RELEASE_ROW_GROUPS == 0:
            release_freed_memory()

    def _close_file(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        path = self._path()
        os.replace(path.with_name(path.name + ".tmp"), path)
        self.files.append((shard_file(self.split, self.chunk, len(self.files)), self.file_rows))
        self.writer, self.file_rows = None, 0


def write_chunk(chunk: Chunk, ctx: ChunkContext) -> str:
    """Pass 2 over ``chunk``'s coded rows: write their ids per split; returns the chunk id.
    Each split's rows of a block are gathered in pieces that fill the row group being
    buffered at most, so pass 2 holds no more than one row group per split besides the
    coded block, and closes a file every ``file_row_groups`` row groups. Files a killed
    earlier try renamed are dropped first: a try with another budget may cut fewer."""
    vocab = _vocabulary(ctx.output)
    # a vocabulary that fits in one slice keeps its pages: no lookup drops and refaults them
    slice_keys = ctx.vocab_slice_keys if vocab.num_keys > ctx.vocab_slice_keys else 0
    out = Path(ctx.output)
    for split in SPLITS:
        for stale in chunk_files(out, split, chunk):
            stale.unlink()
    writers = [ShardWriter(out, s, chunk, ctx.row_group_rows, ctx.file_row_groups) for s in SPLITS]
    for splits, block in load_coded(coded_path(ctx, chunk)):
        entries = entry_values(block, vocab, slice_keys)
        for s, writer in enumerate(writers):
            rows = np.flatnonzero(splits == s)
            while rows.size:
                piece, rows = rows[: writer.room], rows[writer.room :]
                writer.write(shard_table(block, entries, piece))
    files = {split: writer.close() for split, writer in zip(SPLITS, writers)}
    rows = {split: sum(n for _, n in f) for split, f in files.items()}
    marker = {"rows": rows, "files": files, "row_group_rows": ctx.row_group_rows,
              "file_row_groups": ctx.file_row_groups}
    atomic_write_bytes(shard_marker(ctx, chunk), json.dumps(marker).encode())
    coded_path(ctx, chunk).unlink()
    return chunk.id
