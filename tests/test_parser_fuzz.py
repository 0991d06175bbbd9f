"""No byte sequence crashes the parser: every line ends as a kept row or one reject, as an
independent per-line check of the Criteo format decides, through ``parse_block`` and
through the whole ``dnis-preprocess``; ``dnis predict`` reports bad input in one line."""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

import pytest

from launch import predict
from pipeline.data import preprocess
from pipeline.data.criteo_reader import Chunk, iter_blocks, parse_block
from pipeline.data.metadata import DatasetMeta
from pipeline.data.schema import RAW_COLUMNS
from pipeline.inference import RawInputError, read_tsv
from tests.test_preprocess import make_lines

INTEGER = re.compile(rb"-?[0-9]+")
HEX8 = re.compile(rb"[0-9a-fA-F]{8}")
# bytes that str.splitlines, UTF-8 decoders or pyarrow treat specially
ODD_BYTES = [b"\x00", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x85", b"\r", b"\xff", b"\xc3\x28",
             b"\xe2\x80\xa8", b"\xc2\x85", b" ", b"\\", b'"', b"'"]
ODD_VALUES = [b"1" * 19, b"9" * 18, b"-" + b"9" * 18, b"0" * 25 + b"7", b"1000000000000000000",
              b"99999999999999999999999", b"+5", b"-", b"-0", b"1.5", b" 5", b"5 ", b"0x5", b"0X5",
              b"1e3", b"0000000g", b"000000a", b"0000000a0", b"ABCDEF01", b"\xff" * 8, b"\t", b""]


def check_line(line: bytes) -> str | None:
    """The field that makes ``line`` a bad Criteo row (``row`` for its shape), None if good.

    The format: 40 tab-separated fields; label 0 or 1; I1..I13 empty or an integer (optional
    ``-``, digits, absolute value below 10**18); C1..C26 empty or 8 hex chars.
    """
    fields = line.split(b"\t")
    if not line or b"\r" in line or len(fields) != len(RAW_COLUMNS):
        return "row"
    for name, value in zip(RAW_COLUMNS, fields):
        if name == "label":
            ok = INTEGER.fullmatch(value) is not None and int(value) in (0, 1)
        elif name.startswith("I"):
            ok = value == b"" or (INTEGER.fullmatch(value) is not None and abs(int(value)) < 10**18)
        else:
            ok = value == b"" or HEX8.fullmatch(value) is not None
        if not ok:
            return name
    return None


def split_lines(data: bytes) -> list[bytes]:
    """Lines end at b"\\n" only; a last line without one still counts."""
    lines = data.split(b"\n")
    return lines[:-1] if data.endswith(b"\n") else lines


def mutate(line: bytes, rng: random.Random) -> bytes:
    """One random corruption of a real-format row."""
    fields = line.split(b"\t")
    kind = rng.randrange(8)
    if kind == 0:  # random bytes, newlines included
        return bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
    if kind == 1:
        at = rng.randrange(len(line) + 1)
        return line[:at] + rng.choice(ODD_BYTES) + line[at:]
    if kind == 2:
        del fields[rng.randrange(len(fields))]
    elif kind == 3:
        fields.insert(rng.randrange(len(fields) + 1), rng.choice(ODD_VALUES))
    elif kind == 4:
        return line[: rng.randrange(len(line))]
    else:  # a value in place of another: label, dense or categorical
        fields[rng.randrange(len(fields))] = rng.choice(ODD_VALUES)
    return b"\t".join(fields)


def fuzz_bytes(n: int, seed: int) -> bytes:
    """``n`` rows in stretches of 100 with corruption rates 0, 1% and 30%, no final newline."""
    rng = random.Random(seed)
    lines = [line.encode() for line in make_lines(n, seed=seed)]
    rates = [0.0, 0.01, 0.3]
    out = [mutate(line, rng) if rng.random() < rates[i // 100 % 3] else line for i, line in enumerate(lines)]
    return b"\n".join(out)


def expected(data: bytes) -> list[tuple[int, str]]:
    """``(line number from 1, field)`` of every line the format check rejects."""
    return [(i + 1, f) for i, line in enumerate(split_lines(data)) if (f := check_line(line)) is not None]


def test_parse_block_keeps_exactly_the_rows_the_format_check_keeps(tmp_path):
    data = fuzz_bytes(3000, seed=1)
    bad = expected(data)
    assert 200 < len(bad) < 1000  # the fuzz really mixes good and bad rows
    path = tmp_path / "fuzz.txt"
    path.write_bytes(data)
    got, kept, first_line = [], 0, 0
    # small blocks: many block borders, some blocks clean (typed path), most not
    for _, block_data in iter_blocks(Chunk(str(path), "fuzz", 0, 0, len(data), False), block_bytes=3000):
        block = parse_block(block_data)
        got += [(first_line + line + 1, field) for line, field, _ in block.rejects]
        kept += block.rows.size
        assert block.rows.size == block.label.size == block.sparse.shape[0]
        first_line += block.num_lines
    assert first_line == len(split_lines(data))
    assert got == bad
    assert kept == first_line - len(bad)


@pytest.mark.parametrize("column", [0, 5, 20], ids=["label", "I5", "C7"])
def test_one_odd_value_in_a_clean_block_is_judged_like_anywhere_else(column):
    # alone in a block, a value meets pyarrow's typed fast path, which must not be laxer
    rows = [line.encode().split(b"\t") for line in make_lines(5, seed=3)]
    for value in ODD_VALUES:
        rows[2][column] = value
        block = parse_block(b"\n".join(b"\t".join(r) for r in rows) + b"\n")
        field = check_line(b"\t".join(rows[2]))
        assert [(line, f) for line, f, _ in block.rejects] == ([(2, field)] if field else []), value


def read_rejects(out: Path) -> list[list[bytes]]:
    header, *records = split_lines((out / "rejects.tsv").read_bytes())
    assert header == b"file\tline\tfield\treason\trow"
    return [record.split(b"\t") for record in records]


@pytest.mark.parametrize("compress", [False, True], ids=["plain_three_chunks", "gzip_three_blocks"])
def test_preprocess_rejects_name_every_bad_line_across_chunks(tmp_path, compress):
    data = fuzz_bytes(14000, seed=2)
    assert len(data) > 2 << 20  # --chunk-mb 1: three chunks (plain) or three blocks (gzip)
    path = tmp_path / ("fuzz.txt.gz" if compress else "fuzz.txt")
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    out = tmp_path / "out"
    preprocess.main(["--output", str(out), "--dataset", "synthetic", "--workers", "1", "--no-progress",
                     "--chunk-mb", "1", str(path)])
    meta, lines, bad = DatasetMeta.load(out), split_lines(data), expected(data)
    assert meta.rows["read"] == len(lines) and meta.rows["kept"] == len(lines) - len(bad)
    records = read_rejects(out)
    assert all(len(r) == 5 and r[0] == str(path).encode() for r in records)
    assert [(int(r[1]), r[2].decode()) for r in records] == bad
    for r in records:  # the raw column gives back the line's bytes, whatever they were
        assert r[4].decode("unicode_escape").encode("latin-1") == lines[int(r[1]) - 1][:200]


def test_preprocess_without_a_good_row_is_an_error(tmp_path):
    empty, junk = tmp_path / "empty.txt", tmp_path / "junk.txt"
    empty.write_bytes(b"")
    junk.write_bytes(b"\xff\x0b\n\n1\t2\n")
    args = ["--dataset", "synthetic", "--workers", "1", "--no-progress"]
    with pytest.raises(SystemExit, match=rf"no rows in {empty}: no lines"):
        preprocess.main(["--output", str(tmp_path / "a"), *args, str(empty)])
    with pytest.raises(SystemExit, match=rf"no rows in {junk}: all 3 lines rejected"):
        preprocess.main(["--output", str(tmp_path / "b"), *args, str(junk)])
    assert not (tmp_path / "b" / "metadata.json").exists()
    assert [int(r[1]) for r in read_rejects(tmp_path / "b")] == [1, 2, 3]


@pytest.mark.parametrize("bad, message", [
    (lambda row: row + b"\t1", "field row: 41 fields, expected 40"),
    (lambda row: row.replace(b"\t", b"\t\x00", 1), "field I1: not an integer"),
    (lambda row: b"\xff\xfe" + row[1:], "field label: label not 0 or 1"),
    (lambda row: b"\xff\xfe\x0b", "field row: 1 fields, expected 40"),
    (lambda row: row.replace(b"\t", b"\x0c", 1), "field row: 39 fields, expected 40"),
])
def test_read_tsv_names_line_and_field_of_any_bad_bytes(tmp_path, bad, message):
    rows = [line.encode() for line in make_lines(9)]
    rows[6] = bad(rows[6])
    path = tmp_path / "rows.tsv"
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(RawInputError, match=f"^{re.escape(str(path))}:7: {re.escape(message)}$"):
        list(read_tsv(path, block_bytes=200))


@pytest.mark.parametrize("content, message", [
    (b"", ": no rows (empty file)"),
    (b"\xff\x00\n", ":1: field row: 1 fields, expected 40 (or 39 without label)"),
])
def test_predict_reports_bad_input_in_one_line_before_loading_a_model(tmp_path, content, message):
    path = tmp_path / "rows.tsv"
    path.write_bytes(content)
    # no run directory at all: the input is checked first
    with pytest.raises(SystemExit, match=f"^dnis predict: {re.escape(str(path))}{re.escape(message)}$"):
        predict.main(["--run-dir", str(tmp_path / "none"), "--input", str(path), "--out", str(tmp_path / "s.txt")])
    assert not list(tmp_path.glob("s.txt*"))
