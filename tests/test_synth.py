"""The synthetic Criteo generator: determinism, format, distributions, planted signal."""

from __future__ import annotations

import gzip
import hashlib
import json
import re

import numpy as np
import pytest
import torch

from pipeline.data.synth import BLOCK_ROWS, CATEGORICALS, SyntheticCriteo, main, write
from pipeline.data.synth_worlds import WORLDS, HeavyTail


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_same_seed_same_bytes_and_chunking_does_not_matter(tmp_path, world):
    common = ["--rows", "3000", "--world", world]
    main([*common, "--out", str(tmp_path / "a.tsv"), "--seed", "5"])
    main([*common, "--out", str(tmp_path / "b.tsv"), "--seed", "5"])
    main([*common, "--out", str(tmp_path / "c.tsv"), "--seed", "6"])
    main([*common, "--out", str(tmp_path / "days"), "--seed", "5", "--days", "3", "--gzip"])
    a = (tmp_path / "a.tsv").read_bytes()
    assert a == (tmp_path / "b.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()
    days = b"".join(gzip.decompress((tmp_path / "days" / f"day_{d}.gz").read_bytes()) for d in range(3))
    assert days == a
    gen = SyntheticCriteo(seed=5, world=world)
    cut = BLOCK_ROWS - 7  # a chunk boundary inside a generation block
    whole, head, tail = gen.rows(0, BLOCK_ROWS + 10), gen.rows(0, cut), gen.rows(cut, BLOCK_ROWS + 10)
    assert np.array_equal(whole.ranks, np.concatenate([head.ranks, tail.ranks]))
    assert np.array_equal(whole.labels, np.concatenate([head.labels, tail.labels]))


def test_default_world_output_is_unchanged():
    """Hashes computed before worlds existed: adding them must not move a byte."""
    small = SyntheticCriteo(seed=3, vocab_scale=0.1)
    across_blocks = small.to_tsv(small.rows(BLOCK_ROWS - 500, BLOCK_ROWS + 500))
    assert hashlib.sha256(across_blocks).hexdigest() == (
        "820cd39c93c8d95b29cdaa5a7fb28a2c8849b4665c77cf321697bf19337cb7ce")
    full = SyntheticCriteo(seed=5)
    assert hashlib.sha256(full.to_tsv(full.rows(0, 2000))).hexdigest() == (
        "aeb64f41c45c0698e3f77b24b3682bd05e9c53046372fbf454e99560cf393cad")


def test_heavy_tail_plants_distinct_values_without_signal_or_tables():
    tail = HeavyTail("C3", rate=0.9, values=1 << 30, zipf=0.5)
    plain, tailed = SyntheticCriteo(seed=4, vocab_scale=0.1), SyntheticCriteo(seed=4, vocab_scale=0.1, tail=tail)
    n = 2 * BLOCK_ROWS
    a, b = plain.rows(0, n), tailed.rows(0, n)
    c = tail.column
    in_tail = b.ranks[:, c] >= tailed.vocab[c]
    assert abs(in_tail.mean() - 0.9) < 0.01 and (b.ranks[:, np.arange(26) != c] < tailed.vocab[c]).all()
    # every other draw is the plain generator's; the tail's ranks are new values, mostly singletons
    assert np.array_equal(np.delete(a.ranks, c, 1), np.delete(b.ranks, c, 1)) and np.array_equal(a.ints, b.ints)
    assert np.array_equal(a.ranks[~in_tail, c], b.ranks[~in_tail, c])
    hexes = tailed.hex_ids(b.ranks)[in_tail, c]
    assert len(np.unique(hexes)) > 0.9 * in_tail.sum()
    assert len(np.intersect1d(hexes, tailed.hex_ids(np.repeat(np.arange(tailed.vocab[c])[:, None], 26, 1))[:, c])) == 0
    # no label signal: the logit is that of the same row with the tail value missing
    assert np.allclose(b.logits, tailed.logits(np.where(b.ranks >= tailed.vocab, -1, b.ranks), b.ints, b.ints_missing))
    assert 0.2 < b.labels.mean() < 0.3  # calibrated with the tail
    # a function of (seed, tail, global row): any slice equals the whole; no table grew with it
    cut = BLOCK_ROWS + 11
    assert np.array_equal(b.ranks[cut:], tailed.rows(cut, n).ranks)
    assert np.array_equal(b.ranks, SyntheticCriteo(seed=4, vocab_scale=0.1, tail=tail).rows(0, n).ranks)
    assert tailed.w.size == plain.w.size and tailed.v_tail.shape == plain.v_tail.shape


def test_heavy_tail_cli_writes_it_into_the_truth_and_rejects_bad_options(tmp_path):
    main(["--rows", "100", "--out", str(tmp_path / "x.tsv"), "--tail-field", "C1", "--tail-rate", "1"])
    truth = json.loads((tmp_path / "synth_truth.json").read_text())
    assert truth["heavy_tail"] == {"field": "C1", "rate": 1.0, "values": 1 << 30, "zipf": 0.5}
    for bad, message in ((["--tail-field", "C27"], "choose one of C1..C26"),
                         (["--tail-field", "C1", "--tail-zipf", "1"], "zipf exponent must lie in [0, 1)"),
                         (["--tail-field", "C1", "--tail-values", str(2**31 - 10)], "would pass 2^31 ranks")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(["--rows", "10", "--out", str(tmp_path / "y.tsv"), *bad])


def test_rows_are_valid_criteo_tsv(tmp_path):
    write(tmp_path / "x.tsv", 2000, seed=1)
    lines = (tmp_path / "x.tsv").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 2001
    negatives = 0
    for line in lines[:-1]:
        fields = line.decode().split("\t")
        assert len(fields) == 40 and fields[0] in ("0", "1")
        for x in fields[1:14]:
            assert x == "" or x.lstrip("-").isdigit()
            negatives += x.startswith("-")
        for c in fields[14:]:
            assert c == "" or (len(c) == 8 and int(c, 16) >= 0 and c == c.lower())
    assert negatives > 0
    ctr = np.mean([line[:1] == b"1" for line in lines[:-1]])
    assert 0.2 < ctr < 0.3


def test_frequencies_are_zipf_and_missing_rates_as_specified():
    gen = SyntheticCriteo(seed=0, vocab_scale=0.1)
    rows = gen.rows(0, 40000)
    for f, (_, missing, _) in enumerate(CATEGORICALS):
        assert abs((rows.ranks[:, f] < 0).mean() - missing) < 0.02
    big = int(np.argmax(gen.vocab))
    counts = np.bincount(rows.ranks[rows.ranks[:, big] >= 0, big], minlength=gen.vocab[big])
    assert counts[0] > 3 * counts[10] > 0 and counts[10] > 3 * counts[200]
    assert counts[: gen.vocab[big] // 100].sum() > 0.5 * counts.sum()  # 1% of values: most mass
    assert rows.ints_missing[:, 1].mean() == 0 and rows.ints_missing[:, 11].mean() > 0.6
    assert rows.ints.max() > 10**4  # heavy tail


def test_hex_ids_are_a_bijection_unrelated_to_rank():
    gen = SyntheticCriteo(seed=0, vocab_scale=0.1)
    ranks = np.repeat(np.arange(5000)[:, None], len(CATEGORICALS), 1)
    hexes = gen.hex_ids(ranks)
    assert all(len(np.unique(hexes[:, f])) == 5000 for f in range(len(CATEGORICALS)))
    assert not np.all(np.diff(hexes[:, 0].astype(np.int64)) > 0)
    assert not np.array_equal(hexes, SyntheticCriteo(seed=1, vocab_scale=0.1).hex_ids(ranks))


def test_truth_file_describes_the_planted_model(tmp_path):
    write(tmp_path / "x.tsv", 100, seed=2, vocab_scale=0.5)
    truth = json.loads((tmp_path / "synth_truth.json").read_text())
    assert truth["seed"] == 2 and truth["rows"] == 100 and len(truth["categoricals"]) == 26
    assert truth["world"] == "longtail"
    tiers = truth["categoricals"]["C3"]["tiers"]
    assert tiers[0] == [0, 8, 16] and tiers[-1][1] == truth["categoricals"]["C3"]["vocab"]
    assert [d for *_, d in tiers] == sorted((d for *_, d in tiers), reverse=True)
    assert set(truth["scales"]) == {"first_order", "pairwise", "ints"}


def test_planted_latent_dims_shrink_with_rank():
    gen = SyntheticCriteo(seed=0, vocab_scale=0.1)
    latent_dims = WORLDS["longtail"].latent_dims
    head_ranks = np.concatenate([np.arange(n) for n in gen.head_len])
    assert np.array_equal((gen.v_head[:-1] != 0).sum(1), latent_dims(head_ranks))
    tail_ranks = np.concatenate([np.arange(512, 512 + n) for n in gen.tail_len])
    assert np.array_equal((gen.v_tail[:-1] != 0).sum(1), latent_dims(tail_ranks))
    assert np.array_equal(latent_dims(np.array([0, 8, 64, 512, 4096, 32768])), [16, 8, 4, 2, 1, 0])


def test_flat_world_plants_four_dims_in_every_tier(tmp_path):
    write(tmp_path / "x.tsv", 100, seed=2, world="flat")
    truth = json.loads((tmp_path / "synth_truth.json").read_text())
    assert truth["world"] == "flat" and truth["dims_past_tiers"] == 4
    assert {d for _, d in truth["tiers"]} == {4}
    for field in truth["categoricals"].values():
        assert {d for *_, d in field["tiers"]} == {4} and field["tiers"][-1][1] == field["vocab"]
    gen = SyntheticCriteo(seed=2, world="flat")
    assert gen.tail_len.sum() == np.maximum(gen.vocab - 512, 0).sum()  # no rank left without a vector
    for table in (gen.v_head[:-1], gen.v_tail[:-1]):
        assert table.shape[1] == 4 and (table != 0).all()


def test_ratings_world_has_users_and_items_only_and_every_id_matters(tmp_path):
    """MovieLens-1M's shape: C1 users and C2 items, 8 latent dims each whatever its rank,
    every other field empty; the planted dot product carries most of the signal."""
    write(tmp_path / "x.tsv", 100, seed=1, world="ratings")
    truth = json.loads((tmp_path / "synth_truth.json").read_text())
    assert truth["scales"]["ints"] == 0.0 and {i["missing"] for i in truth["integers"].values()} == {1.0}
    assert [truth["categoricals"][c]["vocab"] for c in ("C1", "C2")] == [6040, 3706]
    gen = SyntheticCriteo(seed=1, world="ratings")
    rows = gen.rows(0, 40000)
    assert (rows.ranks[:, :2] >= 0).all() and (rows.ranks[:, 2:] == -1).all() and rows.ints_missing.all()
    assert (np.bincount(rows.ranks[:, 0], minlength=6040) > 0).mean() > 0.98  # nearly every user, in 40k rows
    assert (gen.v_head[:-1] != 0).all() and (gen.v_tail[:-1] != 0).all() and gen.v_tail.shape[1] == 8
    for line in gen.to_tsv(gen.rows(0, 5)).decode().splitlines():
        fields = line.split("\t")
        assert len(fields) == 40 and all(f == "" for f in fields[1:14] + fields[16:])
    first, pairwise, _ = gen._terms(rows.ranks, rows.ints, rows.ints_missing)
    auc = {"true": _auc(rows.labels, rows.logits), "first order": _auc(rows.labels, first),
           "dot product": _auc(rows.labels, pairwise)}
    print(auc)
    assert auc["true"] > 0.85 and auc["dot product"] > auc["first order"] + 0.15


def test_flat_world_shows_most_ids_several_times():
    """Expected counts per id scale with rows / vocab_scale: 80k rows at 0.1 ~ 800k at 1."""
    seen_thrice = {}
    for world in ("longtail", "flat"):
        gen = SyntheticCriteo(seed=0, vocab_scale=0.1, world=world)
        ranks = gen.rows(0, 80000).ranks
        counts = [np.bincount(ranks[ranks[:, f] >= 0, f], minlength=v) for f, v in enumerate(gen.vocab)]
        seen_thrice[world] = sum((c >= 3).sum() for c in counts) / gen.vocab.sum()
    assert seen_thrice["flat"] > 0.95 and seen_thrice["longtail"] < 0.4, seen_thrice


def test_tail_ids_carry_signal_only_in_the_flat_world():
    """The true logit with the tail's latent vectors zeroed: free in longtail, costly in flat."""
    auc_drop = {}
    for world in ("longtail", "flat"):
        gen = SyntheticCriteo(seed=0, world=world)
        rows = gen.rows(0, 30000)
        features = (rows.ranks, rows.ints, rows.ints_missing)
        if world == "longtail":  # past rank 32768 nothing is planted (flat vocabularies end at 20k)
            assert np.array_equal(gen.logits(*features, latent_ranks=32768), rows.logits)
        full = _auc(rows.labels, rows.logits)
        no_tail_latent = _auc(rows.labels, gen.logits(*features, latent_ranks=4096))
        no_tail = _auc(rows.labels, gen.logits(np.where(rows.ranks >= 4096, -1, rows.ranks), *features[1:]))
        auc_drop[world] = (full - no_tail_latent, full - no_tail)
    print("AUC drop (latent, latent + first order) past rank 4096:", auc_drop)
    assert max(auc_drop["longtail"]) < 0.01
    assert min(auc_drop["flat"]) > 0.04


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores))
    pos = labels.sum()
    return float((ranks[labels == 1].sum() - pos * (pos - 1) / 2) / (pos * (len(labels) - pos)))


def _fm_auc(rows, dim: int, train: int, epochs: int = 3) -> float:
    """Held-out AUC of a factorisation machine with ``dim``-dim embeddings (0: logistic)."""
    torch.manual_seed(0)
    cap = 2000  # rarer values share one id per field
    ids = np.where(rows.ranks < 0, cap, np.minimum(rows.ranks, cap)) + np.arange(26) * (cap + 1)
    ids, y = torch.from_numpy(ids), torch.from_numpy(rows.labels.astype(np.float32))
    linear = torch.nn.EmbeddingBag(26 * (cap + 1), 1, mode="sum")
    emb = torch.nn.Embedding(26 * (cap + 1), max(dim, 1))
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.normal_(emb.weight, std=0.01)
    opt = torch.optim.Adam([*linear.parameters(), *emb.parameters()], lr=5e-3)

    def logits(i):
        v = emb(i).sum(1) if dim else 0
        pair = 0.5 * ((v * v).sum(1) - (emb(i) ** 2).sum((1, 2))) if dim else 0
        return linear(i)[:, 0] + pair

    for _ in range(epochs):
        for b in torch.randperm(train).split(512):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(ids[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return _auc(rows.labels[train:], logits(ids[train:]).numpy())


def test_planted_signal_needs_more_than_a_few_dimensions():
    rows = SyntheticCriteo(seed=0, vocab_scale=0.05).rows(0, 60000)
    oracle = _auc(rows.labels[50000:], rows.logits[50000:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only contend on a busy CI machine
    try:
        logistic, fm2, fm8 = (_fm_auc(rows, d, 50000) for d in (0, 2, 8))
    finally:
        torch.set_num_threads(threads)
    print(f"AUC oracle {oracle:.3f} logistic {logistic:.3f} fm2 {fm2:.3f} fm8 {fm8:.3f}")
    assert oracle > 0.85
    assert fm8 > fm2 + 0.02 and fm2 > logistic
