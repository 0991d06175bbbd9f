"""Reading raw Criteo TSV: chunk planning, streaming blocks, vectorised parsing, splits.

A *chunk* is the unit of parallel work and of output (one shard per chunk and split): a
newline-aligned byte range of a plain file, or a whole ``.gz`` file (not seekable). A
chunk is read as *blocks* of at most ``block_bytes`` ending on line boundaries, so memory
stays bounded whatever the file size.

Each block is split into fields by ``pyarrow.csv``: label and integers typed by pyarrow
(blocks it could misread are read as binary and checked with pyarrow.compute),
categoricals binary and decoded with a numpy hex lookup table. A bad row (wrong
field count, non-integer dense value, non-hex category, label not 0/1, empty line, a
carriage return) is reported by line and field and left out. Lines end at b"\\n" only; an
integer is an optional ``-`` and digits worth less than 10**18 (leading zeros allowed).

Split: a row's split depends only on its source name (the basename without ``.gz``, so a
gzipped copy splits like the plain file) and the byte offset of the row in the
uncompressed stream, hashed with the seed (splitmix64): ``criteo_kaggle`` and
``synthetic`` take buckets 0-7 / 8 / 9 of ``hash % 10`` as train / val / test;
``criteo_1tb`` puts ``day_0 .. day_22`` in train and splits ``day_23`` into val / test
halves by ``hash % 2``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.data.schema import NUM_DENSE, NUM_SPARSE, RAW_COLUMNS
from pipeline.data.vocab import hex_bytes_to_uint32

DATASETS = ("criteo_kaggle", "criteo_1tb", "synthetic")
TRAIN, VAL, TEST = 0, 1, 2
_DAY = re.compile(r"^day_(\d+)$")
_READ = 1 << 20
_INT_LIMIT = 10**18  # integers must stay below it: int64 without overflow checks
_INTEGER = r"^-?0*[0-9]{1,18}$"


@dataclass(frozen=True)
class Chunk:
    """A newline-aligned byte range ``[start, end)`` of a plain file, or a whole gzip file."""

    path: str
    name: str
    part: int
    start: int
    end: int
    compressed: bool

    @property
    def id(self) -> str:
        """Shard stem: depends only on the input and the chunk plan, never on who runs it."""
        return f"{self.name}.{self.part:05d}"

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class StreamError(Exception):
    """A gzip stream broke at ``offset`` (uncompressed) after the blocks already yielded."""

    def __init__(self, offset: int, reason: str):
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def source_name(path: str) -> str:
    """Basename without ``.gz``: the split-hash key and the shard stem."""
    base = os.path.basename(path)
    return base[:-3] if base.endswith(".gz") else base


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def plan_chunks(paths: list[str], chunk_bytes: int) -> list[Chunk]:
    """Cut every input into chunks of about ``chunk_bytes``, each starting at a line start."""
    chunks = []
    for path in paths:
        size = os.path.getsize(path)
        name = source_name(path)
        if is_gzip(path):
            chunks.append(Chunk(path, name, 0, 0, size, True))
            continue
        starts = [0]
        with open(path, "rb") as f:
            for cut in range(chunk_bytes, size, chunk_bytes):
                start = _next_line_start(f, max(cut, starts[-1]))
                if start >= size:
                    break
                if start > starts[-1]:
                    starts.append(start)
        ends = starts[1:] + [size]
        chunks += [Chunk(path, name, i, s, e, False) for i, (s, e) in enumerate(zip(starts, ends))]
    return chunks


def _next_line_start(f, pos: int) -> int:
    """First line start at or after ``pos``."""
    f.seek(pos - 1)
    while True:
        piece = f.read(1 << 16)
        if not piece:
            return f.tell()
        nl = piece.find(b"\n")
        if nl >= 0:
            return f.tell() - len(piece) + nl + 1


def count_lines_before(path: str, offset: int) -> int:
    """Newlines in the first ``offset`` bytes of a plain file (for error messages)."""
    lines = 0
    with open(path, "rb") as f:
        while offset > 0:
            piece = f.read(min(_READ * 16, offset))
            if not piece:
                break
            lines += piece.count(b"\n")
            offset -= len(piece)
    return lines


def iter_blocks(chunk: Chunk, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, data)``: the chunk's bytes in blocks that end on a line boundary.

    ``offset`` is the position of ``data`` in the uncompressed stream. A broken gzip
    stream raises ``StreamError`` after the complete lines before the break.
    """
    pieces = _gzip_pieces(chunk.path) if chunk.compressed else _file_pieces(chunk)
    offset, parts, size = chunk.start, [], 0  # joined once per block: += would copy quadratically
    try:
        for piece in pieces:
            parts.append(piece)
            size += len(piece)
            if size < block_bytes:
                continue
            pending = b"".join(parts)
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield offset, pending[:cut]
                offset, pending = offset + cut, pending[cut:]
            parts, size = [pending], len(pending)
    except StreamError as err:
        pending = b"".join(parts)
        cut = pending.rfind(b"\n") + 1
        if cut:
            yield offset, pending[:cut]
        raise StreamError(offset + cut, err.reason) from None
    pending = b"".join(parts)
    if pending:
        yield offset, pending


def _file_pieces(chunk: Chunk) -> Iterator[bytes]:
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        left = chunk.end - chunk.start
        while left > 0:
            piece = f.read(min(_READ * 4, left))
            if not piece:
                return
            left -= len(piece)
            yield piece


def _gzip_pieces(path: str) -> Iterator[bytes]:
    """Decompress (multi-member) gzip; a truncated or corrupt stream raises ``StreamError``."""
    inflater, in_member = zlib.decompressobj(wbits=31), False
    with open(path, "rb") as f:
        while raw := f.read(_READ):
            while raw:
                in_member = True
                try:
                    yield inflater.decompress(raw)
                except zlib.error as err:
                    raise StreamError(-1, f"corrupt gzip ({err})") from None
                raw = b""
                if inflater.eof:
                    raw, in_member = inflater.unused_data, False
                    inflater = zlib.decompressobj(wbits=31)
    if in_member:
        raise StreamError(-1, "truncated gzip (the stream ends before its end marker)")


@dataclass
class ParsedBlock:
    """The good rows of a block, decoded, and the bad lines.

    ``line_starts[i]`` is where line ``i`` starts in the block; ``rows`` are the line
    indices of the good rows, to which every other array is aligned.
    """

    line_starts: np.ndarray
    rows: np.ndarray
    label: np.ndarray
    dense: np.ndarray
    dense_missing: np.ndarray
    sparse: np.ndarray
    sparse_missing: np.ndarray
    rejects: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def num_lines(self) -> int:
        return int(self.line_starts.size)


def parse_block(data: bytes) -> ParsedBlock:
    """Split and decode a block of whole lines; bad lines go to ``rejects``.

    Lines end at b"\\n" only; any other byte is data, so every input ends as good rows
    plus rejects. Blocks without a bad row take one typed pyarrow read; others go on to a
    slower path (field counts in numpy, then a read of the remaining lines as binary).

    >>> b = parse_block(b"1\\t-3" + b"\\t" * 12 + b"\\t0000000a" * 26 + b"\\n\\n")
    >>> b.rows.tolist(), int(b.dense[0, 0]), int(b.sparse[0, 0]), b.rejects
    ([0], -3, 10, [(1, 'row', 'empty line')])
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    ends = newlines if data.endswith(b"\n") else np.r_[newlines, len(data)]
    starts = np.r_[0, newlines + 1][: ends.size]
    rejects: dict[int, tuple[str, str]] = {}
    for line in np.flatnonzero(ends == starts):
        rejects[int(line)] = ("row", "empty line")
    if data.find(b"\r") >= 0:  # pyarrow would end a row there
        for line in np.unique(np.searchsorted(starts, np.flatnonzero(buf == 13), side="right") - 1):
            rejects[int(line)] = ("row", "carriage return in row")
    lines = _kept(np.arange(ends.size), rejects)
    table = _read_fields(_lines_of(data, starts, ends, lines, rejects))
    if table is None:  # some line has the wrong number of fields
        fields = 1 + np.bincount(np.searchsorted(ends, np.flatnonzero(buf == 9)), minlength=ends.size)
        for line in lines[fields[lines] != len(RAW_COLUMNS)]:
            rejects[int(line)] = ("row", f"{fields[line]} fields, expected {len(RAW_COLUMNS)}")
        lines = _kept(lines, rejects)
        table = _read_fields(_lines_of(data, starts, ends, lines, rejects), typed=False)
    assert table.num_rows == lines.size, (table.num_rows, lines.size)
    block = _decode(table, lines, rejects)
    block.line_starts = starts
    block.rejects = sorted((line, f, r) for line, (f, r) in rejects.items())
    return block


def _kept(lines: np.ndarray, rejects: dict) -> np.ndarray:
    """``lines`` less the rejected ones."""
    return np.setdiff1d(lines, np.fromiter(rejects, dtype=np.int64)) if rejects else lines


def _lines_of(data: bytes, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray, rejects: dict) -> bytes:
    """The bytes of ``lines`` (the whole block when nothing was rejected)."""
    if not rejects:
        return data
    return b"".join(data[starts[i] : ends[i] + 1] for i in lines.tolist())


def _read_fields(data: bytes, typed: bool = True) -> pa.Table | None:
    """Columns of ``data`` (label and integers typed when ``typed`` and pyarrow's integer
    parser cannot be laxer than ours), or None when a row has a wrong field count."""
    types = {c: pa.binary() for c in RAW_COLUMNS}
    if not data:  # pyarrow refuses an empty input
        return pa.table({c: pa.array([], t) for c, t in types.items()})
    # pyarrow's int64 parser also takes " 5", "5 " and "0x5": such blocks are read as binary
    if typed and data.find(b" ") < 0 and data.find(b"x") < 0 and data.find(b"X") < 0:
        types.update({c: pa.int64() for c in RAW_COLUMNS[: 1 + NUM_DENSE]})
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=list(RAW_COLUMNS), use_threads=False,
                                           block_size=max(1 << 24, len(data) + 1)),
            parse_options=pacsv.ParseOptions(
                delimiter="\t", quote_char=False, escape_char=False, newlines_in_values=False,
                ignore_empty_lines=False,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=types, null_values=[""],
                strings_can_be_null=False, quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:
        if typed:  # a value pyarrow cannot type: read as binary, decode by our rules
            return _read_fields(data, typed=False)
        return None


def _column(table: pa.Table, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, data)`` of a binary column, as numpy views."""
    arr = table.column(i).combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64), data


def _decode(table: pa.Table, lines: np.ndarray, rejects: dict) -> ParsedBlock:
    n = table.num_rows
    bad = np.zeros((n, len(RAW_COLUMNS)), dtype=bool)
    label, label_missing, label_bad = _int_column(table, 0)
    bad[:, 0] = label_missing | label_bad | ((label != 0) & (label != 1))
    dense = np.zeros((n, NUM_DENSE), dtype=np.int64)
    dense_missing = np.zeros((n, NUM_DENSE), dtype=bool)
    for j in range(NUM_DENSE):
        dense[:, j], dense_missing[:, j], bad[:, 1 + j] = _int_column(table, 1 + j)
    sparse = np.zeros((n, NUM_SPARSE), dtype=np.uint32)
    sparse_missing = np.zeros((n, NUM_SPARSE), dtype=bool)
    for j in range(NUM_SPARSE):
        col = 1 + NUM_DENSE + j
        sparse[:, j], sparse_missing[:, j], bad[:, col] = _parse_hex_column(*_column(table, col))
    rows_bad = bad.any(axis=1)
    for i in np.flatnonzero(rows_bad):
        col = int(bad[i].argmax())
        reason = "label not 0 or 1" if col == 0 else (
            "not an integer" if col <= NUM_DENSE else "not 8 hex chars")
        rejects[int(lines[i])] = (RAW_COLUMNS[col], reason)
    good = ~rows_bad
    return ParsedBlock(
        np.zeros(0, np.int64), lines[good], label[good].astype(np.float32), dense[good],
        dense_missing[good], sparse[good], sparse_missing[good],
    )


def _int_column(table: pa.Table, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, missing, bad)`` of an integer column, typed by pyarrow or still binary.

    An integer is an optional ``-`` and decimal digits worth less than 10**18 in absolute
    value (leading zeros allowed), whichever path the block took.
    """
    arr = table.column(i).combine_chunks()
    if pa.types.is_integer(arr.type):
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        values = arr.fill_null(0).to_numpy().astype(np.int64, copy=False)
        return values, missing, (values >= _INT_LIMIT) | (values <= -_INT_LIMIT)
    missing = pc.binary_length(arr).to_numpy() == 0
    ok = pc.match_substring_regex(arr, _INTEGER).fill_null(False)
    text = pc.if_else(ok, arr.view(pa.string()), "0")
    values = pc.cast(text, pa.int64()).to_numpy()
    return values, missing, ~missing & ~ok.to_numpy(zero_copy_only=False)


def _parse_hex_column(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-hex-char categoricals: ``(uint32 values, missing, bad)``."""
    lengths = np.diff(offsets)
    missing = lengths == 0
    values = np.zeros(lengths.size, dtype=np.uint32)
    present = int(lengths.size - missing.sum())
    if present * 8 == data.size and (lengths[~missing] == 8).all():
        # the usual case: the data buffer is the present values back to back
        decoded, ok = hex_bytes_to_uint32(data.reshape(present, 8))
        values[~missing] = decoded
        bad = np.zeros(lengths.size, dtype=bool)
        bad[~missing] = ~ok
    else:
        idx = np.minimum(offsets[:-1, None] + np.arange(8), max(data.size - 1, 0))
        decoded, ok = hex_bytes_to_uint32(data[idx] if data.size else np.zeros((lengths.size, 8), np.uint8))
        bad = ~missing & ((lengths != 8) | ~ok)
        values = np.where(missing | bad, np.uint32(0), decoded)
    values[bad] = 0
    return values, missing, bad


def check_sources(dataset: str, names: list[str]) -> None:
    """Fail early on inputs the split rule cannot place (or that would collide)."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"inputs share a basename (the split key and shard name): {dupes}")
    if dataset == "criteo_1tb":
        for name in names:
            match = _DAY.match(name)
            if not match or int(match.group(1)) > 23:
                raise ValueError(f"{name}: criteo_1tb inputs must be named day_0 .. day_23 (optionally .gz)")


def split_rule(dataset: str, seed: int) -> dict:
    """The split rule as recorded in ``metadata.json``."""
    key = "splitmix64(blake2b(seed, basename without .gz) + byte offset of the row)"
    if dataset == "criteo_1tb":
        return {"rule": "day", "train_days": [0, 22], "val_test_day": 23,
                "val_test": "hash % 2: 0 val, 1 test", "seed": seed, "hash": key}
    return {"rule": "hash", "ratios": [8, 1, 1], "buckets": "hash % 10: 0-7 train, 8 val, 9 test",
            "seed": seed, "hash": key}


def assign_splits(dataset: str, seed: int, name: str, offsets: np.ndarray) -> np.ndarray:
    """Split (0 train, 1 val, 2 test) of the rows of source ``name`` at byte ``offsets``.

    >>> assign_splits("criteo_1tb", 0, "day_3", np.array([0, 100])).tolist()
    [0, 0]
    """
    if dataset == "criteo_1tb" and int(_DAY.match(name).group(1)) < 23:
        return np.full(offsets.shape, TRAIN, dtype=np.int8)
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    h = _splitmix64(np.uint64(int.from_bytes(digest, "little")) + offsets.astype(np.uint64))
    if dataset == "criteo_1tb":
        return (VAL + (h % np.uint64(2))).astype(np.int8)
    bucket = h % np.uint64(10)
    return np.where(bucket < 8, TRAIN, np.where(bucket == 8, VAL, TEST)).astype(np.int8)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
