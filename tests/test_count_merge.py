"""Counts merged in key ranges under a memory budget rank exactly like one whole-field merge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data import preprocess
from pipeline.data.count_merge import merge_range, plan_merge, range_bits, write_vocabulary
from pipeline.data.metadata import encode_counts
from pipeline.data.schema import SPLITS
from pipeline.data.vocab import MISSING_BUCKET, Vocabulary, frequency_rank
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


def write_chunk_counts(work, cid: str, per_field: list) -> None:
    """What pass 1 leaves for the merge (see ``chunk_passes.count_chunk``)."""
    sizes = np.array([k.size for k, _ in per_field])
    np.save(work / "counts" / f"{cid}.keys.npy", np.concatenate([k for k, _ in per_field]).astype(np.int64))
    np.save(work / "counts" / f"{cid}.counts.npy", np.concatenate([c for _, c in per_field]).astype(np.int64))
    np.savez(work / "counts" / f"{cid}.npz", sizes=sizes, offsets=np.r_[0, np.cumsum(sizes)])


@pytest.mark.parametrize("memory_bytes", [1 << 30, 200_000], ids=["one_range", "many_ranges"])
def test_ranged_merge_equals_frequency_rank_of_the_whole_field(tmp_path, memory_bytes):
    rng = np.random.default_rng(0)
    (tmp_path / "counts").mkdir()
    (tmp_path / "merge").mkdir()
    chunks = {f"c{i}": [chunk_counts(rng, f, 4000) for f in FIELDS] for i in range(3)}
    for cid, per_field in chunks.items():
        write_chunk_counts(tmp_path, cid, per_field)
    tasks = plan_merge(tmp_path, list(chunks), FIELDS, memory_bytes)
    bits = {t.name: t.bits for t in tasks}
    upper = sum(per_field[0][0].size for per_field in chunks.values())  # the chunks' distinct wide keys
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


def test_output_does_not_depend_on_the_memory_budget_or_workers(tmp_path, monkeypatch):
    planned = []
    monkeypatch.setattr(preprocess, "plan_merge", lambda *a: planned.append(plan_merge(*a)) or planned[-1])
    lines = wide_lines(30000)
    lines[7] = "1\tnot a row"
    path = write(tmp_path / "wide.txt", lines)
    common = ["--dataset", "synthetic", "--min-count", "2", "--no-progress", "--chunk-mb", "1", path]
    preprocess.main(["--output", str(tmp_path / "big"), "--workers", "1", *common])
    assert max(t.bits for t in planned[-1]) == 0
    small = preprocess.Options((path,), str(tmp_path / "small"), memory_mb=1)
    assert small.context().block_bytes < 200_000  # blocks shrink to the budget too
    preprocess.main(["--output", str(tmp_path / "small"), "--workers", "2", "--memory-mb", "1", *common])
    assert {t.name for t in planned[-1] if t.bits >= 1} >= {"C3"}  # C3 was merged in key ranges
    big, small = tmp_path / "big", tmp_path / "small"
    assert stable_meta(big) == stable_meta(small)
    a, b = dataset_tables(big), dataset_tables(small)
    assert all(a[s].equals(b[s]) for s in SPLITS)
    for f in sorted(p.name for p in (big / "vocab").iterdir()):
        assert (big / "vocab" / f).read_bytes() == (small / "vocab" / f).read_bytes(), f
    assert (big / "rejects.tsv").read_text() == (small / "rejects.tsv").read_text()
    assert json.loads((big / "vocab" / "index.json").read_text())["fields"]["C3"]["size"] > 4000
