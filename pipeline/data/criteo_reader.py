"""Reading raw Criteo TSV: chunk planning, streaming blocks, vectorised parsing, splits.

A *chunk* is the unit of parallel work and of output (one shard per chunk and split): a
newline-aligned byte range of a plain file, or a whole ``.gz`` file (not seekable). A
chunk is read as *blocks* of at most ``block_bytes`` ending on line boundaries, so memory
stays bounded whatever the file size.

Each block is split into binary fields by ``pyarrow.csv``; every column is
dictionary-coded (pyarrow's hash kernel) and only its distinct values are decoded:
integers checked and cast with pyarrow.compute, categoricals with a numpy hex lookup
table. A bad row (wrong
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
_INTEGER = r"^-?0*[0-9]{1,18}$"  # below 10**18: int64 without overflow checks


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
    """The good rows of a block, dictionary-coded per column, and the bad lines.

    ``line_starts[i]`` is where line ``i`` starts in the block; ``rows`` are the line
    indices of the good rows, to which ``label`` and the columns of ``codes`` are aligned.
    Column ``c`` (``I1..I13`` then ``C1..C26``) of row ``i`` is entry ``codes[c, i]`` of
    that column's dictionary: ``values[c]`` (int64; a categorical's uint32; 0 when empty)
    and ``absent[c]`` (the value is empty). Each distinct raw value is decoded, counted
    and looked up once per block, not once per row.
    """

    line_starts: np.ndarray
    rows: np.ndarray
    label: np.ndarray
    codes: np.ndarray
    values: list[np.ndarray]
    absent: list[np.ndarray]
    rejects: list[tuple[int, str, str]] = field(default_factory=list)

    @classmethod
    def from_arrays(cls, label, dense, dense_missing, sparse, sparse_missing) -> "ParsedBlock":
        """A block of already decoded rows (each row its own dictionary entry)."""
        n = label.size
        columns = [(dense[:, j], dense_missing[:, j]) for j in range(NUM_DENSE)]
        columns += [(sparse[:, j], sparse_missing[:, j]) for j in range(NUM_SPARSE)]
        return cls(np.zeros(0, np.int64), np.arange(n), label,
                   np.tile(np.arange(n, dtype=np.int32), (len(columns), 1)),
                   [np.where(m, 0, v).astype(np.int64) for v, m in columns], [m for _, m in columns])

    @property
    def num_lines(self) -> int:
        return int(self.line_starts.size)

    @property
    def dense(self) -> np.ndarray:
        """Decoded integers ``[rows, 13]`` (0 where empty); ``sparse`` likewise, uint32."""
        return np.stack([self.values[j][self.codes[j]] for j in range(NUM_DENSE)], axis=1)

    @property
    def sparse(self) -> np.ndarray:
        cols = range(NUM_DENSE, NUM_DENSE + NUM_SPARSE)
        return np.stack([self.values[c][self.codes[c]] for c in cols], axis=1).astype(np.uint32)


def parse_block(data: bytes) -> ParsedBlock:
    """Split and decode a block of whole lines; bad lines go to ``rejects``.

    Lines end at b"\\n" only; any other byte is data, so every input ends as good rows
    plus rejects. Blocks whose every line has 40 fields take one pyarrow read; others go on
    to field counts in numpy, then a read of the remaining lines.

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
        table = _read_fields(_lines_of(data, starts, ends, lines, rejects))
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


def _read_fields(data: bytes) -> pa.Table | None:
    """Binary columns of ``data`` (values are judged by our rules, never pyarrow's), or
    None when a row has a wrong field count."""
    if not data:  # pyarrow refuses an empty input
        return pa.table({c: pa.array([], pa.binary()) for c in RAW_COLUMNS})
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
                column_types={c: pa.binary() for c in RAW_COLUMNS}, null_values=[],
                strings_can_be_null=False, quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:
        return None


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, data)`` of a binary array, as numpy views."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64), data


def _decode(table: pa.Table, lines: np.ndarray, rejects: dict) -> ParsedBlock:
    """Dictionary-code every column (a hash pass in pyarrow), judge each distinct value
    once, and reject the rows that hold a bad one (naming their first bad field)."""
    n = table.num_rows
    codes = np.empty((NUM_DENSE + NUM_SPARSE, n), dtype=np.int32)
    values, absent = [], []
    first_bad = np.full(n, len(RAW_COLUMNS))
    for col in range(len(RAW_COLUMNS)):
        coded = table.column(col).combine_chunks().dictionary_encode()
        index = coded.indices.to_numpy()
        if col <= NUM_DENSE:
            entry, missing, bad = _int_entries(coded.dictionary)
        else:
            entry, missing, bad = _hex_entries(*_buffers(coded.dictionary))
        if col == 0:
            bad |= missing | ((entry != 0) & (entry != 1))
            label = entry[index]
        else:
            codes[col - 1] = index
            values.append(entry)
            absent.append(missing)
        if bad.any():
            rows_bad = bad[index] & (first_bad == len(RAW_COLUMNS))
            first_bad[rows_bad] = col
    rows_bad = first_bad < len(RAW_COLUMNS)
    for i in np.flatnonzero(rows_bad):
        col = int(first_bad[i])
        reason = "label not 0 or 1" if col == 0 else (
            "not an integer" if col <= NUM_DENSE else "not 8 hex chars")
        rejects[int(lines[i])] = (RAW_COLUMNS[col], reason)
    if rows_bad.any():
        good = ~rows_bad
        codes, label, lines = codes[:, good], label[good], lines[good]
    return ParsedBlock(np.zeros(0, np.int64), lines, label.astype(np.float32), codes, values, absent)


def _int_entries(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, missing, bad)`` of binary integer texts.

    An integer is an optional ``-`` and decimal digits worth less than 10**18 in absolute
    value (leading zeros allowed); values are 0 where missing or bad.
    """
    missing = pc.binary_length(arr).to_numpy() == 0
    ok = pc.match_substring_regex(arr, _INTEGER).fill_null(False)
    text = pc.if_else(ok, arr.view(pa.string()), "0")
    values = pc.cast(text, pa.int64()).to_numpy()
    return values, missing, ~missing & ~ok.to_numpy(zero_copy_only=False)


def _hex_entries(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-hex-char categoricals: ``(int64 values, missing, bad)``; values are 0 where
    missing or bad."""
    lengths = np.diff(offsets)
    missing = lengths == 0
    idx = np.minimum(offsets[:-1, None] + np.arange(8), max(data.size - 1, 0))
    decoded, ok = hex_bytes_to_uint32(data[idx] if data.size else np.zeros((lengths.size, 8), np.uint8))
    bad = ~missing & ((lengths != 8) | ~ok)
    return np.where(missing | bad, 0, decoded.astype(np.int64)), missing, bad


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
