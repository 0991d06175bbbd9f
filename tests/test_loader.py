"""Feature layouts and the parquet loader on a tiny dataset written by the test."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from data_fixtures import BUCKETS, VOCAB, read_split, write_dataset
from pipeline.data.features import FeatureLayout
from pipeline.data.loader import SplitReader, search_batches
from pipeline.data.schema import BUCKET_FIELDS, DENSE_FIELDS, SPARSE_FIELDS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dataset")
    meta = write_dataset(path)
    return path, meta


def layout(data, mode="embedding"):
    return FeatureLayout.from_meta(data[1], mode)


def reader(data, split="train", mode="embedding", **kw):
    kw.setdefault("batch_size", 32)
    return SplitReader(data[0], split, layout(data, mode), **kw)


def row_ids(batch):
    """Source row ids (``I1``) of a batch's non-padding rows."""
    return batch.dense[batch.labels >= 0, 0].long().tolist()


def same(a, b) -> bool:
    return (
        torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
        and a.sparse.keys() == b.sparse.keys() and torch.equal(a.sparse.values(), b.sparse.values())
        and torch.equal(a.sparse.lengths(), b.sparse.lengths())
        and (a.sparse.weights_or_none() is None) == (b.sparse.weights_or_none() is None)
        and (a.sparse.weights_or_none() is None or torch.equal(a.sparse.weights(), b.sparse.weights()))
    )


def test_layouts_of_the_three_dense_modes(data):
    meta = data[1]
    emb = layout(data, "embedding")
    assert emb.keys == DENSE_FIELDS + SPARSE_FIELDS and emb.weighted
    assert emb.num_embeddings["I3"] == 1 and emb.num_embeddings["C1"] == VOCAB
    assert emb.counts["I3"] == [[meta.dense_counts["I3"], 1]] and emb.counts["C2"] == meta.id_counts["C2"]
    mlp = layout(data, "mlp")
    assert mlp.keys == SPARSE_FIELDS and not mlp.weighted and mlp.num_dense == 13
    bucket = layout(data, "bucket")
    assert bucket.keys == SPARSE_FIELDS + BUCKET_FIELDS and not bucket.weighted
    assert bucket.num_embeddings["B1"] == BUCKETS and set(bucket.counts) == set(bucket.keys)
    with pytest.raises(ValueError, match="dense_mode"):
        FeatureLayout.from_meta(meta, "onehot")


@pytest.mark.parametrize("mode", ["embedding", "bucket"])
def test_batches_hold_the_parquet_rows(data, mode):
    cols = read_split(data[0], "test")
    batches = list(reader(data, "test", mode, shuffle=False, drop_last=False, batch_size=40).batches())
    assert [b.size for b in batches] == [40] * 4
    labels = torch.cat([b.labels for b in batches])
    n = len(cols["label"])
    assert torch.equal(labels[:n], torch.from_numpy(cols["label"])) and (labels[n:] == -1).all()
    dense = torch.cat([b.dense for b in batches])[:n]
    assert torch.equal(dense, torch.from_numpy(np.stack([cols[c] for c in DENSE_FIELDS], 1)))
    for key in layout(data, mode).keys:
        jt = [b.sparse[key] for b in batches]
        ids = torch.cat([j.values() for j in jt])
        if key in DENSE_FIELDS:
            assert (ids == 0).all()
            assert torch.equal(torch.cat([j.weights() for j in jt])[:n], torch.from_numpy(cols[key]))
        else:
            assert torch.equal(ids[:n], torch.from_numpy(cols[key]).long()) and (ids[n:] == 0).all()
            if mode == "embedding":
                assert (torch.cat([j.weights() for j in jt]) == 1).all()


def test_train_ranks_are_disjoint_full_and_equal_in_count(data):
    readers = [reader(data, rank=r, world_size=3, seed=1) for r in range(3)]
    counts = {r.num_batches() for r in readers}
    assert len(counts) == 1 and counts.pop() > 0
    seen = []
    for r in readers:
        batches = list(r.batches(epoch=0))
        assert len(batches) == r.num_batches() and all(b.size == 32 for b in batches)
        seen.append({i for b in batches for i in row_ids(b)})
    assert all(len(s) == 32 * readers[0].num_batches() for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) <= set(range(500))
    # Only the remainder is left out: each rank's share is 500 // 3 rows.
    assert readers[0].num_batches() == (500 // 3) // 32


@pytest.mark.parametrize("shuffle", [False, True])
def test_eval_sees_every_row_once_with_padding(data, shuffle):
    readers = [
        reader(data, "val", rank=r, world_size=4, drop_last=False, shuffle=shuffle, batch_size=16)
        for r in range(4)
    ]
    all_ids = []
    for r in readers:
        batches = list(r.batches(epoch=1))
        assert len(batches) == readers[0].num_batches() and all(b.size == 16 for b in batches)
        all_ids += [i for b in batches for i in row_ids(b)]
        pad = torch.cat([b.labels for b in batches]) < 0
        assert pad.any()  # 150 rows do not fill 4 ranks evenly
        pad_ids = torch.cat([b.sparse.values().view(-1, b.size)[:, b.labels < 0] for b in batches], 1)
        assert (pad_ids == 0).all()
    assert sorted(all_ids) == list(range(500, 650))


def test_order_is_deterministic_per_seed_and_changes_per_epoch(data):
    first = [row_ids(b) for b in reader(data, seed=3).batches(epoch=0)]
    again = [row_ids(b) for b in reader(data, seed=3).batches(epoch=0)]
    other_epoch = [row_ids(b) for b in reader(data, seed=3).batches(epoch=1)]
    other_seed = [row_ids(b) for b in reader(data, seed=4).batches(epoch=0)]
    assert first == again and first != other_epoch and first != other_seed


def test_start_resumes_at_the_tail_without_reading_skipped_units(data, monkeypatch):
    r = reader(data, rank=1, world_size=2, prefetch=0)
    full = list(r.batches(epoch=2))
    reads = []
    original = SplitReader._read
    monkeypatch.setattr(SplitReader, "_read", lambda self, unit: reads.append(unit) or original(self, unit))
    tail = list(r.batches(epoch=2, start=len(full) - 2))
    assert len(tail) == 2 and all(same(a, b) for a, b in zip(tail, full[-2:]))
    first_unit = r.units[r.rank_pieces(2)[0][0]]
    assert first_unit not in reads and len(reads) < len(r.rank_pieces(2))


def test_prefetch_reraises_producer_errors_and_stops_on_close(data, monkeypatch):
    r = reader(data, prefetch=2)
    it = r.batches()
    next(it)
    it.close()
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())

    def broken(self, unit):
        raise OSError("disk on fire")

    monkeypatch.setattr(SplitReader, "_read", broken)
    with pytest.raises(OSError, match="disk on fire"):
        list(r.batches())


def test_too_small_split_for_one_batch_is_an_error(data):
    with pytest.raises(ValueError, match="no batch"):
        reader(data, "val", batch_size=1000)


def search_readers(data):
    train = reader(data, batch_size=16, world_size=2, rank=1)
    val = reader(data, "val", batch_size=16, world_size=2, rank=1)
    return train, val


def test_search_batches_add_validation_rows_on_alpha_steps(data):
    train, val = search_readers(data)
    steps = list(search_batches(train, val, alpha_interval=2, epoch=0, start=0, global_step=0))
    assert len(steps) == train.num_batches()
    assert [s.size for s in steps[:4]] == [32, 16, 32, 16]
    val_ids = [row_ids(s)[16:] for s in steps[::2]]
    n = val.num_batches()
    expected = [row_ids(b) for b in val.batches(epoch=0)] + [row_ids(b) for b in val.batches(epoch=1)]
    assert val_ids == expected[: len(val_ids)] and len(val_ids) > n  # wraps into cycle 1
    assert all(min(ids) >= 500 for ids in val_ids)  # validation rows come from val


def test_search_batches_resume_equals_uninterrupted_run(data):
    train, val = search_readers(data)
    nb = train.num_batches()
    run = list(search_batches(train, val, 2, 0, 0, 0)) + list(search_batches(train, val, 2, 1, 0, nb))
    resumed = list(search_batches(train, val, 2, 1, 3, nb + 3))
    assert len(resumed) == nb - 3 and all(same(a, b) for a, b in zip(resumed, run[nb + 3 :]))
