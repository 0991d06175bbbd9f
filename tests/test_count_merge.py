"""Pass 1's counts spill in runs under a key budget, counts merged in key ranges under a
memory budget rank exactly like one whole-field merge, and pass 2's row groups and
vocabulary lookups fit the budget with the same rows and ids."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import preprocess
from pipeline.data.chunk_passes import FOOTER_ROW_GROUP_BYTES, SHARD_ROW_BYTES
from pipeline.data.count_merge import merge_range, plan_merge, range_bits, write_vocabulary
from pipeline.data.count_runs import COUNT_BYTES_PER_KEY, CountRuns, run_file, runs_dir
from pipeline.data.metadata import DatasetMeta, encode_counts
from pipeline.data.schema import SPLITS
from pipeline.data.vocab import MISSING_BUCKET, VOCAB_BYTES_PER_KEY, FieldVocab, Vocabulary, frequency_rank
from tests.test_preprocess import dataset_tables, make_lines, stable_meta, write

FIELDS = ("wide", "buckets", "empty")


def chunk_counts(rng, field: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's distinct keys (ascending) and counts, with many ties."""
    if field == "wide":  # uint32 hex values shared by chunks; counts 2..39 (ties abound), a few rare
        keys = np.unique(rng.choice(np.random.default_rng(99).integers(0, 2**32, 2 * n), n))
        return keys, np.where(rng.random(keys.size) < 0.002, 1, rng.integers(2, 40, keys.size))
    if field == "buckets":  # small, negative and the missing-integer key
        keys = np.r_[rng.integers(-50, 200, n), MISSING_BUCKET]
        keys = np.unique(keys)
        return keys, rng.integers(1, 7, keys.size)
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def write_chunk_counts(work: Path, cid: str, per_field: list, rng) -> None:
    """What pass 1 leaves for the merge (see ``chunk_passes.count_chunk``): each key's count
    arrives in two parts, in blocks of 500 keys per field, under a key budget that spills
    runs, so most keys are in two runs."""
    runs = CountRuns(work, cid, len(per_field), max_keys=3000)
    first = [rng.integers(0, counts + 1) for _, counts in per_field]
    for part in (first, [counts - f for (_, counts), f in zip(per_field, first)]):
        for start in range(0, max(k.size for k, _ in per_field), 500):
            for j, (keys, _) in enumerate(per_field):
                counts = part[j][start : start + 500]
                runs.add(j, keys[start : start + 500][counts > 0], counts[counts > 0])
    np.savez(work / "counts" / f"{cid}.npz", **runs.close())


def read_runs(work: Path, cid: str, field: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One field's ``(keys, counts)`` of every run of a chunk."""
    with np.load(work / "counts" / f"{cid}.npz") as z:
        offsets = z["offsets"]
    return [(np.load(run_file(work, cid, r, "keys"))[o[field] : o[field + 1]],
             np.load(run_file(work, cid, r, "counts"))[o[field] : o[field + 1]]) for r, o in enumerate(offsets)]


def test_counts_spill_sorted_runs_past_max_keys_that_sum_to_the_chunk(tmp_path):
    (tmp_path / "counts").mkdir()
    stale = runs_dir(tmp_path, "c")
    stale.mkdir()
    (stale / "00007.keys.npy").write_bytes(b"a killed attempt's run")
    rng = np.random.default_rng(1)
    runs = CountRuns(tmp_path, "c", num_fields=2, max_keys=1000)
    assert not any(stale.iterdir())
    want = [Counter(), Counter()]
    held = []
    for block in range(30):  # field 0: 200 new keys a block; field 1: 50 keys over and over
        for field, keys in ((0, np.arange(200) * 30 + block), (1, rng.permutation(50))):
            counts = rng.integers(1, 4, keys.size)
            runs.add(field, keys, counts)
            want[field].update(dict(zip(keys.tolist(), counts.tolist())))
            held.append(runs.size)
    np.savez(tmp_path / "counts" / "c.npz", **runs.close())
    assert max(held) <= 1000 < 200 * 30
    sizes = np.load(tmp_path / "counts" / "c.npz")["sizes"]
    assert len(sizes) >= 6 and (sizes[:-1].sum(axis=1) > 500).all()  # spilled past max_keys / 2
    for field in range(2):
        got = Counter()
        for keys, counts in read_runs(tmp_path, "c", field):
            assert (np.diff(keys) > 0).all()
            got.update(dict(zip(keys.tolist(), counts.tolist())))
        assert got == want[field]


def test_repeated_keys_compact_without_spilling(tmp_path):
    runs = CountRuns(tmp_path, "c", num_fields=1, max_keys=1000)
    for _ in range(100):
        runs.add(0, np.arange(300), np.ones(300, np.int64))
    assert runs.close()["sizes"].tolist() == [[300]]


def test_count_bytes_per_key_bounds_the_peak_of_spilling_counts(tmp_path):
    """tracemalloc: 2M distinct keys through a 500k-key budget stay under the per-key bound."""
    rng = np.random.default_rng(2)
    runs = CountRuns(tmp_path, "c", num_fields=2, max_keys=500_000)
    tracemalloc.start()
    for _ in range(20):
        keys = np.unique(rng.integers(0, 2**32, 100_000))
        runs.add(0, keys, rng.integers(1, 5, keys.size))
        runs.add(1, np.arange(50), np.ones(50, np.int64))
        del keys
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(runs.sizes) >= 3 and peak <= COUNT_BYTES_PER_KEY * (500_000 + 100_000)


@pytest.mark.parametrize("memory_mb", [1, 64, 256, 2048])
def test_blocks_share_the_budget_with_pass_one_counts_and_pass_two_buffers(memory_mb):
    ctx = preprocess.Options(("x",), "out", memory_mb=memory_mb).context()
    budget = memory_mb << 20
    blocks = preprocess.BLOCK_RSS_FACTOR * ctx.block_bytes
    counts = ctx.count_keys * COUNT_BYTES_PER_KEY
    assert blocks + counts <= budget
    assert counts >= budget * (1 - preprocess.BLOCK_SHARE) - COUNT_BYTES_PER_KEY
    row_groups = len(SPLITS) * SHARD_ROW_BYTES * ctx.row_group_rows
    assert blocks + row_groups + ctx.vocab_slice_keys * VOCAB_BYTES_PER_KEY <= budget
    footers = len(SPLITS) * FOOTER_ROW_GROUP_BYTES * ctx.file_row_groups  # the open files' footers
    if memory_mb > 1:  # at 1 MiB one row group's footer is more than the footers' share
        assert blocks + row_groups + footers + ctx.vocab_slice_keys * VOCAB_BYTES_PER_KEY <= budget
        assert footers >= (budget - blocks) * preprocess.FOOTER_SHARE - len(SPLITS) * FOOTER_ROW_GROUP_BYTES
    else:
        assert ctx.file_row_groups == 1
    if memory_mb == 2048:  # the default row groups fit the default budget
        assert ctx.row_group_rows == 1_000_000
    else:  # else they take their share of what the blocks leave
        assert row_groups >= (budget - blocks) * preprocess.ROW_GROUP_SHARE - len(SPLITS) * SHARD_ROW_BYTES
    asked = preprocess.Options(("x",), "out", memory_mb=memory_mb, row_group_rows=300)
    assert asked.context().row_group_rows == 300 and preprocess.row_group_note(asked) is None


def mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, mapped = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("Rss:") and mapped:
                total += int(line.split()[1]) << 10
            elif not line.split()[0].endswith(":"):  # a mapping's header: range perms offset dev inode path
                mapped = line.rstrip().endswith(str(path))
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_sliced_lookups_give_the_same_ids_and_keep_one_slice_of_pages(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 2**32, 2_400_000))
    Vocabulary({"C1": FieldVocab(keys, rng.permutation(keys.size).astype(np.int32), 7)}).save(tmp_path / "vocab")
    field = Vocabulary.load(tmp_path / "vocab").fields["C1"]
    files = [tmp_path / "vocab" / f"C1.{part}.npy" for part in ("keys", "ids")]
    queries = np.r_[rng.choice(keys, 200_000), rng.integers(0, 2**32, 5000), -1, 2**40]
    missing = rng.random(queries.size) < 0.01
    want = field.ids_of(queries, missing)
    assert sum(map(mapped_rss, files)) > 0.9 * sum(p.stat().st_size for p in files)  # every page touched
    resident = []
    real_drop = FieldVocab.drop_pages
    monkeypatch.setattr(FieldVocab, "drop_pages", lambda f: resident.append(sum(map(mapped_rss, files))) or real_drop(f))
    for slice_keys in (100_000, 800_000, keys.size - 1, keys.size):
        resident.clear()
        np.testing.assert_array_equal(field.ids_of(queries, missing, slice_keys), want)
        slices = -(-keys.size // slice_keys)
        assert len(resident) == (1 if slices == 1 else 1 + slices)  # first drop: the boundaries' pages
        # a slice's pages, and what the kernel maps around a fault at either end of it, per file:
        # 64 KiB, or a whole large folio of the page cache (2 MiB at most)
        assert max(resident[-slices:]) <= slice_keys * VOCAB_BYTES_PER_KEY + 4 * (2 << 20)
        assert sum(map(mapped_rss, files)) == 0


@pytest.mark.parametrize("memory_bytes", [1 << 30, 200_000], ids=["one_range", "many_ranges"])
def test_ranged_merge_equals_frequency_rank_of_the_whole_field(tmp_path, memory_bytes):
    rng = np.random.default_rng(0)
    (tmp_path / "counts").mkdir()
    (tmp_path / "merge").mkdir()
    chunks = {f"c{i}": [chunk_counts(rng, f, 4000) for f in FIELDS] for i in range(3)}
    for cid, per_field in chunks.items():
        write_chunk_counts(tmp_path, cid, per_field, rng)
    tasks = plan_merge(tmp_path, list(chunks), FIELDS, memory_bytes)
    bits = {t.name: t.bits for t in tasks}
    upper = sum(np.load(tmp_path / "counts" / f"{cid}.npz")["sizes"][:, 0].sum() for cid in chunks)
    assert upper > 1.5 * sum(per_field[0][0].size for per_field in chunks.values())  # keys in 2 runs
    assert bits["wide"] == range_bits(upper, memory_bytes) and (memory_bytes > 1 << 20 or bits["wide"] >= 2)
    for task in tasks:
        merge_range(task, tmp_path, list(chunks), min_count=2)
    missing = {"wide": 5, "buckets": 0, "empty": 5}
    got = write_vocabulary(tmp_path, tasks, missing, tmp_path / "vocab")
    vocab = Vocabulary.load(tmp_path / "vocab")
    for j, field in enumerate(FIELDS):  # the reference: one process sums the field, then ranks it
        keys, inverse = np.unique(np.concatenate([c[j][0] for c in chunks.values()]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([c[j][1] for c in chunks.values()])).astype(np.int64)
        kept, ids, oov_id, by_id = frequency_rank(keys, counts, missing[field], min_count=2)
        np.testing.assert_array_equal(vocab.fields[field].keys, kept, err_msg=field)
        np.testing.assert_array_equal(vocab.fields[field].ids, ids, err_msg=field)
        assert vocab.fields[field].oov_id == got["oov_ids"][field] == oov_id, field
        assert got["id_counts"][field] == encode_counts(by_id), field
        assert got["vocab_sizes"][field] == kept.size + 1
        assert got["distinct_values"][field] == keys.size, field
    # the OOV id lands among tied counts somewhere inside the wide field, not at an end
    assert 0 < got["oov_ids"]["wide"] < got["vocab_sizes"]["wide"] - 1


def wide_lines(n: int) -> list[str]:
    """Criteo lines whose C3 holds about ``n / 3`` distinct values (high cardinality)."""
    rng = np.random.default_rng(5)
    lines = [line.split("\t") for line in make_lines(n, seed=2)]
    for f, value in zip(lines, rng.integers(0, 2**32, n // 3)[rng.integers(0, n // 3, n)]):
        f[16] = f"{int(value):08x}"
    return ["\t".join(f) for f in lines]


def runs_per_chunk(work: Path) -> list[int]:
    return [len(np.load(npz)["sizes"]) for npz in sorted((work / "counts").glob("*.npz"))]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain_chunks", "gz"])
def test_output_does_not_depend_on_the_memory_budget_or_workers(tmp_path, monkeypatch, capsys, compressed):
    planned, runs = [], []
    monkeypatch.setattr(preprocess, "plan_merge", lambda *a: planned.append(plan_merge(*a)) or planned[-1])
    real_merge = preprocess.merge_counts
    monkeypatch.setattr(preprocess, "merge_counts",
                        lambda chunks, opts: runs.append(runs_per_chunk(opts.context().work)) or real_merge(chunks, opts))
    lines = wide_lines(30000)
    lines[7] = "1\tnot a row"
    path = write(tmp_path / "wide.txt", lines)
    if compressed:  # one chunk
        path = str(tmp_path / "wide.txt.gz")
        Path(path).write_bytes(gzip.compress((tmp_path / "wide.txt").read_bytes()))
    common = ["--dataset", "synthetic", "--min-count", "2", "--no-progress", "--chunk-mb", "1", path]
    preprocess.main(["--output", str(tmp_path / "big"), "--workers", "1", *common])
    assert max(t.bits for t in planned[-1]) == 0 and set(runs[-1]) == {1}
    ctx = preprocess.Options((path,), str(tmp_path / "small"), memory_mb=1).context()
    assert ctx.block_bytes < 200_000  # blocks shrink to the budget too
    preprocess.main(["--output", str(tmp_path / "small"), "--workers", "2", "--memory-mb", "1", *common])
    assert {t.name for t in planned[-1] if t.bits >= 1} >= {"C3"}  # C3 was merged in key ranges
    assert sum(runs[-1]) > len(runs[-1]) and min(runs[-1]) >= (3 if compressed else 1)  # pass 1 spilled
    big, small = tmp_path / "big", tmp_path / "small"
    # pass 2 wrote smaller row groups, said so and recorded it, and looked C3 up in two slices
    assert capsys.readouterr().err.count("row groups of 309 rows, not 1,000,000: --memory-mb 1") == 1
    assert (DatasetMeta.load(big).row_group_rows, DatasetMeta.load(small).row_group_rows) == (1_000_000, 309)
    assert ctx.row_group_rows == 309 and ctx.vocab_slice_keys < Vocabulary.load(big / "vocab").fields["C3"].keys.size
    # and closed a file after each row group (what 1 MiB lets a writer's footer hold)
    assert ctx.file_row_groups == 1
    by_chunk: dict[str, list[int]] = {}
    for f in DatasetMeta.load(small).files["train"]:
        meta = pq.ParquetFile(small / f).metadata
        assert meta.num_row_groups == 1
        by_chunk.setdefault(Path(f).name.split(".part")[0], []).append(meta.row_group(0).num_rows)
    assert len(by_chunk) == len(DatasetMeta.load(big).files["train"])
    for sizes in by_chunk.values():
        assert set(sizes[:-1]) == {309} and sizes[-1] <= 309
    assert {**stable_meta(big), "row_group_rows": 309} == stable_meta(small)
    a, b = dataset_tables(big), dataset_tables(small)
    assert all(a[s].equals(b[s]) for s in SPLITS)
    for f in sorted(p.name for p in (big / "vocab").iterdir()):
        assert (big / "vocab" / f).read_bytes() == (small / "vocab" / f).read_bytes(), f
    assert (big / "rejects.tsv").read_text() == (small / "rejects.tsv").read_text()
    assert json.loads((big / "vocab" / "index.json").read_text())["fields"]["C3"]["size"] > 4000


def test_killed_pass_one_restarts_the_chunk_without_its_stale_runs(tmp_path, monkeypatch):
    path = tmp_path / "day.txt.gz"
    path.write_bytes(gzip.compress("".join(line + "\n" for line in wide_lines(12000)).encode()))
    common = ["--dataset", "synthetic", "--no-progress", "--workers", "1", str(path)]
    preprocess.main(["--output", str(tmp_path / "ref"), *common])
    real_spill = CountRuns.spill

    def killed_after_two_runs(runs):
        if len(runs.sizes) == 2:
            raise RuntimeError("killed")
        real_spill(runs)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(CountRuns, "spill", killed_after_two_runs)
        with pytest.raises(RuntimeError, match="killed"):
            preprocess.main(["--output", str(out), "--memory-mb", "1", *common])
    stale = sorted(p.name for p in runs_dir(out / "_work", "day.txt.00000").iterdir())
    assert stale == ["00000.counts.npy", "00000.keys.npy", "00001.counts.npy", "00001.keys.npy"]
    left = []
    real_merge = preprocess.merge_counts
    monkeypatch.setattr(preprocess, "merge_counts", lambda chunks, opts: left.append(sorted(
        p.name for p in runs_dir(opts.context().work, "day.txt.00000").iterdir())) or real_merge(chunks, opts))
    preprocess.main(["--output", str(out), *common])  # resumed with the default budget: one run
    assert left == [["00000.counts.npy", "00000.keys.npy"]]
    assert stable_meta(out) == stable_meta(tmp_path / "ref")
    a, b = dataset_tables(out), dataset_tables(tmp_path / "ref")
    assert all(a[s].equals(b[s]) for s in SPLITS)
