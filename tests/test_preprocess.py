"""dnis-preprocess on tiny hand-written Criteo files: ranks, OOV, rejects, resume, no-op, gz."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import chunk_passes, preprocess
from pipeline.data.criteo_reader import TRAIN, Chunk, assign_splits, parse_block, source_name
from pipeline.data.features import FeatureLayout
from pipeline.data.loader import SplitReader
from pipeline.data.metadata import DatasetMeta
from pipeline.data.schema import BUCKET_FIELDS, SPARSE_FIELDS, SPLITS, bucket_key, dense_transform
from pipeline.data.vocab import MISSING_BUCKET, Vocabulary

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo_sample"


def make_lines(n: int, seed: int = 0) -> list[str]:
    """``n`` valid Criteo lines with skewed values, missing fields and negative ints."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 40) ** (1 + j % 3))) for j in range(13)]
        cats = ["" if rng.random() < 0.15 * (j % 3) else f"{int(rng.zipf(1.6)) % (50 + j * 7):08x}" for j in range(26)]
        lines.append("\t".join([str(i % 3 % 2)] + ints + cats))
    return lines


def write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def run_cli(out: Path, inputs: list[str], *extra: str, dataset: str = "synthetic") -> DatasetMeta:
    preprocess.main(["--output", str(out), "--dataset", dataset, "--workers", "1", "--no-progress",
                     "--chunk-mb", "1", *extra, *inputs])
    return DatasetMeta.load(out)


def read_split(out: Path, meta: DatasetMeta, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / f) for f in meta.files[split]])


def reference_ids(keys: list, train: np.ndarray, min_count: int) -> tuple[dict, int, list[int]]:
    """Brute-force frequency ranks: None is missing (OOV); OOV first among ties, then key."""
    counts = Counter(k for k, t in zip(keys, train) if t)
    oov = sum(c for k, c in counts.items() if k is None or c < min_count)
    entries = [(c, 1, k) for k, c in counts.items() if k is not None and c >= min_count] + [(oov, 0, None)]
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    ids = {k: i for i, (_, _, k) in enumerate(entries)}
    return ids, ids[None], [c for c, _, _ in entries]


def test_round_trip_ranks_by_train_frequency_with_ranked_oov(tmp_path):
    fields = [line.split("\t") for line in make_lines(400)]
    for i, f in enumerate(fields):  # C1 (column 14): missing every 5th row, else 8 chars
        f[14] = "" if i % 5 == 0 else "00000000"
    offsets = np.cumsum([0] + [len("\t".join(f)) + 1 for f in fields[:-1]])
    train = assign_splits("synthetic", 0, "a.txt", offsets) == TRAIN
    for i, f in enumerate(fields):  # same lengths, so the splits stay as computed
        if f[14]:  # 0000beef only outside train: frequent overall, yet OOV
            f[14] = f"{i % 4:08x}" if train[i] else "0000beef"
    fields[int(np.flatnonzero(train & (np.arange(400) % 5 != 0))[0])][14] = "0000cafe"  # rare
    path = write(tmp_path / "a.txt", ["\t".join(f) for f in fields])
    out = tmp_path / "out"
    meta = run_cli(out, [path], "--min-count", "2")

    assert meta.rows == {"read": 400, "kept": 400, "rejected": 0, "train": int(train.sum()),
                         "val": meta.rows["val"], "test": meta.rows["test"]}
    for name, col, kind in [(f, 14 + j, "hex") for j, f in enumerate(SPARSE_FIELDS)] + \
                           [(f, 1 + j, "int") for j, f in enumerate(BUCKET_FIELDS)]:
        raw = [f[col] for f in fields]
        keys = [int(v, 16) if v else None for v in raw] if kind == "hex" else \
            [int(bucket_key(np.array([int(v)]))[0]) if v else MISSING_BUCKET for v in raw]
        ids, oov, counts = reference_ids(keys, train, 2)
        expect = np.array([ids.get(k, oov) for k in keys])
        got = {s: read_split(out, meta, s).column(name).to_numpy() for s in SPLITS}
        splits = assign_splits("synthetic", 0, "a.txt", offsets)
        for s, split in enumerate(SPLITS):
            np.testing.assert_array_equal(got[split], expect[splits == s], err_msg=name)
        assert meta.oov_ids[name] == oov and meta.counts(name).tolist() == counts, name
        assert meta.distinct_values[name] == len({k for k, t in zip(keys, train) if t and k is not None}), name
        # ids are frequency ranks of the train split: recount them from the shards
        assert np.bincount(got["train"], minlength=len(counts)).tolist() == counts, name
    assert read_split(out, meta, "val").column("C1").to_numpy().max() == meta.oov_ids["C1"]  # 0000beef
    assert meta.oov_ids["C1"] < meta.vocab_sizes["C1"] - 1  # ranked by count, not appended
    table = read_split(out, meta, "train")
    raw_i1 = [f[1] for f, t in zip(fields, train) if t]
    want = dense_transform(np.array([int(v) if v else 0 for v in raw_i1]))
    np.testing.assert_allclose(table.column("I1").to_numpy(), want)
    assert any(v.startswith("-") for v in raw_i1) and any(v == "" for v in raw_i1)
    assert meta.dense_counts["I1"] == sum(v != "" for v in raw_i1)
    assert table.schema.field("C1").type == pa.int32() and table.schema.field("I1").type == pa.float32()

    vocab = Vocabulary.load(out / "vocab")
    train_fields = [f for f, t in zip(fields, train) if t]
    for name, col in (("C1", 14), ("C7", 20), ("B2", 2)):
        np.testing.assert_array_equal(vocab.lookup(name, [f[col] for f in train_fields]),
                                      table.column(name).to_numpy())
    assert vocab.lookup("C1", ["0000beef", "", "00000000"]).tolist() == [meta.oov_ids["C1"]] * 2 + [
        table.column("C1").to_numpy()[[f[14] == "00000000" for f in train_fields]][0]]


def test_serving_encodes_raw_rows_as_the_shards_hold_them(tmp_path):
    """``encode_columns`` (what a served model reads of raw rows) gives every shard column
    exactly as preprocessing wrote it: OOV, missing and negative values, buckets, dtypes."""
    lines = make_lines(400, seed=5)
    path = write(tmp_path / "a.txt", lines)
    out = tmp_path / "out"
    meta = run_cli(out, [path], "--min-count", "2")
    vocab, block = Vocabulary.load(out / "vocab"), parse_block(Path(path).read_bytes())
    columns = chunk_passes.SHARD_SCHEMA.names[1:]
    encoded = dict(zip(columns, chunk_passes.encode_columns(block, vocab, columns)))
    splits = assign_splits("synthetic", 0, "a.txt", np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]))
    oov = 0
    for s, split in enumerate(SPLITS):
        table = read_split(out, meta, split)
        for column in columns:
            got, want = encoded[column][splits == s], table.column(column).to_numpy()
            assert got.dtype == want.dtype, column
            np.testing.assert_array_equal(got, want, err_msg=f"{split} {column}")
            oov += int((got == meta.oov_ids[column]).sum()) if column in meta.oov_ids else 0
    assert oov > 0 and all(s in splits for s in range(len(SPLITS)))
    picked = chunk_passes.encode_columns(block, vocab, ["C3", "B2", "I1"])  # any columns, in any order
    assert all(np.array_equal(a, encoded[c]) for a, c in zip(picked, ["C3", "B2", "I1"]))


BAD = {  # line (1-based) -> (field, bad line)
    3: ("row", "1\t2\t3"),
    7: ("I3", "\t".join(["0", "1", "2", "1.5"] + [""] * 10 + ["0000000a"] * 26)),
    11: ("C5", "\t".join(["1"] + [""] * 13 + ["0000000a"] * 4 + ["zzzzzzzz"] + ["0000000a"] * 21)),
    12: ("C2", "\t".join(["1"] + [""] * 13 + ["0000000a", "abc"] + ["0000000a"] * 24)),
    20: ("label", "\t".join(["2"] + [""] * 13 + ["0000000a"] * 26)),
    25: ("row", ""),
    5990: ("C26", "\t".join(["0"] + ["1"] * 13 + ["0000000a"] * 25 + ["0000000a0"])),
}


def bad_file(tmp_path: Path) -> str:
    lines = make_lines(6000)  # > 1 MiB: two chunks, so line numbers cross a chunk border
    for line, (_, text) in BAD.items():
        lines[line - 1] = text
    return write(tmp_path / "bad.txt", lines)


def test_bad_rows_land_in_rejects_with_file_line_field_and_strict_stops(tmp_path):
    path = bad_file(tmp_path)
    meta = run_cli(tmp_path / "out", [path])
    rows = [r.split("\t") for r in (tmp_path / "out" / "rejects.tsv").read_text().splitlines()[1:]]
    assert [(r[0], int(r[1]), r[2]) for r in rows] == [(path, n, f) for n, (f, _) in BAD.items()]
    assert "1.5" in rows[1][4] and rows[1][3] == "not an integer"
    assert meta.rows["rejected"] == len(BAD) and meta.rows["kept"] == 6000 - len(BAD)
    assert len(meta.files["train"]) == 2
    with pytest.raises(SystemExit, match=rf"{path}:3: field row: 3 fields, expected 40"):
        run_cli(tmp_path / "strict", [path], "--strict")
    assert not (tmp_path / "strict" / "metadata.json").exists()
    lines = make_lines(6000)
    lines[5989] = BAD[5990][1]
    path2 = write(tmp_path / "late.txt", lines)
    with pytest.raises(SystemExit, match=rf"{path2}:5990: field C26: not 8 hex chars"):
        run_cli(tmp_path / "strict2", [path2], "--strict")


def test_truncated_gzip_keeps_rows_before_the_break(tmp_path):
    lines = make_lines(3000)
    blob = gzip.compress("".join(line + "\n" for line in lines).encode())
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(blob[: len(blob) // 2])
    meta = run_cli(tmp_path / "out", [str(path)])
    kept = meta.rows["kept"]
    assert 0 < kept < 3000 and meta.rows["rejected"] == 1 and meta.rows["read"] == kept + 1
    (reject,) = (tmp_path / "out" / "rejects.tsv").read_text().splitlines()[1:]
    assert reject.split("\t")[:4] == [str(path), str(kept + 1), "row", "truncated gzip (the stream ends before its end marker)"]
    with pytest.raises(SystemExit, match=rf"{path}:{kept + 1}: field row: truncated gzip"):
        run_cli(tmp_path / "strict", [str(path)], "--strict")


def dataset_tables(out: Path) -> dict:
    meta = DatasetMeta.load(out)
    return {s: read_split(out, meta, s) for s in SPLITS}


def stable_meta(out: Path) -> dict:
    meta = DatasetMeta.load(out).__dict__.copy()
    for volatile in ("sources", "options", "files"):
        meta.pop(volatile)
    return meta


def test_resume_after_a_crash_gives_identical_output(tmp_path, monkeypatch):
    inputs = [bad_file(tmp_path), write(tmp_path / "b.txt", make_lines(500, seed=1))]
    run_cli(tmp_path / "ref", inputs)
    out = tmp_path / "out"
    real_write = preprocess.write_chunk

    def crash_midway(chunk, ctx):
        if chunk.part == 1:
            raise RuntimeError("killed")
        return real_write(chunk, ctx)

    monkeypatch.setattr(preprocess, "write_chunk", crash_midway)
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(out, inputs)
    assert not (out / "metadata.json").exists() and (out / "_work").is_dir()
    done = sorted(p.name for p in (out / "train").glob("*.parquet"))
    assert done == ["bad.txt.00000.part00000.parquet"]

    def must_not_count(chunk, ctx):
        raise AssertionError(f"pass 1 redone for {chunk.id}")

    written = []
    monkeypatch.setattr(preprocess, "count_chunk", must_not_count)
    monkeypatch.setattr(preprocess, "write_chunk", lambda c, ctx: written.append(c.id) or real_write(c, ctx))
    run_cli(out, inputs)
    assert written == ["bad.txt.00001", "b.txt.00000"]  # the finished shard was reused
    assert stable_meta(out) == stable_meta(tmp_path / "ref")
    ref, got = dataset_tables(tmp_path / "ref"), dataset_tables(out)
    assert all(ref[s].equals(got[s]) for s in SPLITS)
    assert (out / "rejects.tsv").read_text() == (tmp_path / "ref" / "rejects.tsv").read_text()
    assert not (out / "_work").exists()


def test_rerun_is_a_noop_and_other_options_need_overwrite(tmp_path, capsys):
    inputs = [write(tmp_path / "a.txt", make_lines(300))]
    out = tmp_path / "out"
    run_cli(out, inputs)
    stamp = os.path.getmtime(out / "metadata.json")
    capsys.readouterr()
    run_cli(out, inputs)
    assert "already complete with these options; nothing to do" in capsys.readouterr().out
    assert os.path.getmtime(out / "metadata.json") == stamp
    with pytest.raises(SystemExit, match=r"other options .*min_count.*--overwrite"):
        run_cli(out, inputs, "--min-count", "3")
    assert run_cli(out, inputs, "--min-count", "3", "--overwrite").min_count == 3


def test_gzip_input_equals_plain_input(tmp_path):
    lines = make_lines(800)
    plain = write(tmp_path / "day.txt", lines)
    (tmp_path / "gz").mkdir()
    packed = tmp_path / "gz" / "day.txt.gz"
    packed.write_bytes(gzip.compress(Path(plain).read_bytes()))
    assert source_name(str(packed)) == source_name(plain)
    run_cli(tmp_path / "a", [plain])
    run_cli(tmp_path / "b", [str(packed)])
    assert stable_meta(tmp_path / "a") == stable_meta(tmp_path / "b")
    a, b = dataset_tables(tmp_path / "a"), dataset_tables(tmp_path / "b")
    assert all(a[s].equals(b[s]) for s in SPLITS)


def test_criteo_1tb_splits_by_day(tmp_path):
    inputs = [write(tmp_path / "day_0", make_lines(200)), write(tmp_path / "day_23", make_lines(200, 1))]
    meta = run_cli(tmp_path / "out", inputs, dataset="criteo_1tb")
    assert meta.files["train"] == ["train/day_0.00000.part00000.parquet"]
    assert meta.rows["train"] == 200 and meta.rows["val"] + meta.rows["test"] == 200
    assert 60 < meta.rows["val"] < 140
    with pytest.raises(SystemExit, match="must be named day_0 .. day_23"):
        run_cli(tmp_path / "bad", [write(tmp_path / "train.txt", make_lines(5))], dataset="criteo_1tb")


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        preprocess.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--output", "--dataset", "--min-count", "--seed", "--strict", "--workers",
                   "--chunk-mb", "--row-group-rows", "--memory-mb", "--overwrite", "--no-progress"):
        assert option in text
    module = subprocess.run([sys.executable, "-m", "pipeline.data.preprocess", "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert module.returncode == 0 and "--min-count" in module.stdout
    script = Path(sys.executable).with_name("dnis-preprocess")
    if script.exists():
        assert subprocess.run([str(script), "--help"], capture_output=True).returncode == 0


def test_real_criteo_sample_two_workers(tmp_path):
    files = sorted(SAMPLE.glob("*.txt")) if SAMPLE.is_dir() else []
    if len(files) != 2:
        pytest.skip(f"{SAMPLE} not present")
    out = tmp_path / "out"
    preprocess.main(["--output", str(out), "--dataset", "criteo_kaggle", "--workers", "2",
                     "--no-progress", *map(str, files)])
    meta = DatasetMeta.load(out)
    assert meta.rows["read"] == 200 and meta.rows["rejected"] == 0 and meta.rows["kept"] == 200
    train = read_split(out, meta, "train")
    for name in SPARSE_FIELDS + BUCKET_FIELDS:
        counts = meta.counts(name)
        assert (np.diff(counts) <= 0).all() and counts.size == meta.vocab_sizes[name]
        assert np.bincount(train.column(name).to_numpy(), minlength=counts.size).tolist() == counts.tolist()


def test_shard_writer_holds_at_most_file_row_groups_row_groups(tmp_path, monkeypatch):
    """A parquet writer keeps each row group's footer metadata until it closes its file:
    the shard writer closes one every ``file_row_groups`` row groups."""
    open_row_groups, held = [], []
    real = pq.ParquetWriter

    class Counting(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            open_row_groups.append(0)

        def write_table(self, table, row_group_size=None):
            super().write_table(table, row_group_size=row_group_size)
            open_row_groups[-1] += 1
            held.append(open_row_groups[-1])

    monkeypatch.setattr(pq, "ParquetWriter", Counting)
    chunk = Chunk("/x/day_0", "day_0", 0, 0, 1, True)
    writer = chunk_passes.ShardWriter(tmp_path, "train", chunk, row_group_rows=10, file_row_groups=3)
    table = pa.table({f.name: np.arange(95).astype(f.type.to_pandas_dtype()) for f in chunk_passes.SHARD_SCHEMA},
                     schema=chunk_passes.SHARD_SCHEMA)
    done = 0
    for size in (7, 4, 30, 1, 53):  # pieces cut at the row group's room, as write_chunk does
        while size:
            take = min(size, writer.room)
            writer.write(table.slice(done, take))
            done, size = done + take, size - take
    files = writer.close()
    assert max(held) == 3 and open_row_groups == [3, 3, 3, 1]
    assert files == [(f"train/day_0.00000.part{k:05d}.parquet", n) for k, n in enumerate((30, 30, 30, 5))]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [Path(f).name for f, _ in files]
    assert [pq.ParquetFile(tmp_path / f).metadata.num_row_groups for f, _ in files] == [3, 3, 3, 1]
    assert pa.concat_tables([pq.read_table(tmp_path / f) for f, _ in files]).equals(table)


def batches(out: Path, split: str, **kw) -> list:
    layout = FeatureLayout.from_meta(DatasetMeta.load(out), "embedding")
    return [b for rank in (0, 1) for b in SplitReader(out, split, layout, batch_size=64, rank=rank, world_size=2,
                                                       prefetch=0, **kw).batches(epoch=1)]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.dense, y.dense) and torch.equal(x.labels, y.labels)
        and torch.equal(x.sparse.values(), y.sparse.values()) and torch.equal(x.sparse.weights(), y.sparse.weights())
        for x, y in zip(a, b))


def test_several_files_per_split_read_back_as_one(tmp_path):
    """A budget whose footers hold 3 row groups per file: several files per chunk and split,
    whose rows, read back in metadata order, and the loader's batches are those of one file."""
    path = write(tmp_path / "a.txt", make_lines(7000))  # > 1 MiB: two chunks
    one, parts = tmp_path / "one", tmp_path / "parts"
    ctx = preprocess.Options((path,), str(parts), chunk_mb=1, row_group_rows=50, memory_mb=38).context()
    assert ctx.file_row_groups == 3 and ctx.row_group_rows == 50
    run_cli(one, [path], "--row-group-rows", "50")
    meta = run_cli(parts, [path], "--row-group-rows", "50", "--memory-mb", "38")
    assert len(DatasetMeta.load(one).files["train"]) == 2  # one file per chunk
    assert len(meta.files["train"]) > 2 * 5 and len(meta.files["val"]) > 2
    for split, files in meta.files.items():
        assert sorted(p.name for p in (parts / split).iterdir()) == sorted(Path(f).name for f in files)
        groups = [pq.ParquetFile(parts / f).metadata.num_row_groups for f in files]
        assert max(groups) == 3 and set(groups) <= {1, 2, 3}, split
    assert stable_meta(one) == stable_meta(parts)
    a, b = dataset_tables(one), dataset_tables(parts)
    assert all(a[s].equals(b[s]) for s in SPLITS)
    assert same_batches(batches(one, "train"), batches(parts, "train"))
    assert same_batches(batches(one, "val", shuffle=False, drop_last=False),
                        batches(parts, "val", shuffle=False, drop_last=False))


def test_a_chunk_killed_between_files_is_rewritten_without_stale_files(tmp_path, monkeypatch):
    """Killed after some of a chunk's files were renamed: no metadata.json, every file under
    a final name is complete, and the resumed run (another budget: fewer files) drops them."""
    inputs = [write(tmp_path / "a.txt", make_lines(4000))]
    run_cli(tmp_path / "ref", inputs, "--row-group-rows", "50")
    out = tmp_path / "out"
    real_close = chunk_passes.ShardWriter._close_file
    closed = []

    def killed_after_five_files(writer):
        if writer.writer is not None and len(closed) == 5:
            raise RuntimeError("killed")
        closed.append(writer)
        real_close(writer)

    monkeypatch.setattr(chunk_passes.ShardWriter, "_close_file", killed_after_five_files)
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(out, inputs, "--row-group-rows", "50", "--memory-mb", "38")
    monkeypatch.undo()
    assert not (out / "metadata.json").exists()
    finished = sorted((out / "train").glob("*.parquet"))
    assert len(finished) == 5 and all(pq.ParquetFile(f).metadata.num_row_groups == 3 for f in finished)
    run_cli(out, inputs, "--row-group-rows", "50")
    meta = DatasetMeta.load(out)
    assert meta.files == DatasetMeta.load(tmp_path / "ref").files
    for split, files in meta.files.items():
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(Path(f).name for f in files)
    ref, got = dataset_tables(tmp_path / "ref"), dataset_tables(out)
    assert all(ref[s].equals(got[s]) for s in SPLITS)


def test_a_run_killed_before_files_had_parts_finishes(tmp_path, monkeypatch):
    """Chunks whose markers (written before files had parts) name no files keep their one
    ``<chunk>.parquet`` per split when the run resumes."""
    inputs = [bad_file(tmp_path)]
    run_cli(tmp_path / "ref", inputs)
    out = tmp_path / "out"
    monkeypatch.setattr(preprocess, "finalize", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(out, inputs)
    monkeypatch.undo()
    for marker in sorted((out / "_work" / "shards").glob("*.json")):
        doc = json.loads(marker.read_text())
        for split, [(name, _)] in doc.pop("files").items():
            (out / name).rename(out / split / f"{marker.stem}.parquet")
        marker.write_text(json.dumps(doc))
    meta = run_cli(out, inputs)
    assert meta.files["train"] == ["train/bad.txt.00000.parquet", "train/bad.txt.00001.parquet"]
    ref, got = dataset_tables(tmp_path / "ref"), dataset_tables(out)
    assert all(ref[s].equals(got[s]) for s in SPLITS)
