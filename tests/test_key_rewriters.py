"""The training-time ``KeyRewriter`` and the serving ``SingleHotKeyRewriter`` send ids
to the repacked model's column slabs alike: against a per-group rewrite written out by
hand, against each other on plans whose groups merge into segments, and on both of the
single-hot rewriter's search paths."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from plans.structured import Group, GroupPlan, StructuredPlan
from sharding.kjt import single_hot_kjt
from sharding.repack import COMPARE_BOUNDS, COMPARE_ROWS, KeyRewriter, SingleHotKeyRewriter
from test_repack import K, NUMS, multi_hot_batch, random_ids, searched


def naive_rewrite(features, plan, keys):
    """Per slab, the ids of the groups at least as wide as its end, as rows of the
    groups' stacked ranges (the slow reference)."""
    per_key = features.to_dict()
    out = {}
    for key in keys:
        kept = sorted((g for g in plan.groups if g.group.key == key and g.width), key=lambda g: g.group.start)
        widths = sorted({g.width for g in kept})
        jt = per_key[key]
        for lo, hi in zip([0] + widths[:-1], widths):
            stored = [g for g in kept if g.width >= hi]
            firsts = [sum(g.group.rows for g in stored[:i]) for i in range(len(stored))]
            rows = []
            for ids, weights in zip(jt.to_dense(), jt.to_dense_weights()):
                hits = [(first + i - g.group.start, w) for i, w in zip(ids.tolist(), weights.tolist())
                        for g, first in zip(stored, firsts) if g.group.start <= i < g.group.stop]
                rows.append((torch.tensor([r for r, _ in hits], dtype=ids.dtype),
                             torch.tensor([w for _, w in hits], dtype=weights.dtype)))
            out[f"{key}:{lo}-{hi}"] = rows
    return out


def test_key_rewriter_matches_a_per_group_rewrite_on_weighted_multi_hot_batches():
    _, plan = searched(seed=2)
    g = torch.Generator().manual_seed(0)
    keys = ["c", "a", "b"]  # not the plan's key order
    lengths = torch.randint(0, 4, (len(keys) * 5,), generator=g)
    values = torch.cat([torch.randint(0, NUMS[keys[i // 5]], (int(n),), generator=g) for i, n in enumerate(lengths)])
    kjt = KeyedJaggedTensor(keys, values, weights=torch.rand(values.numel(), generator=g), lengths=lengths)
    got = KeyRewriter(plan, list(NUMS))(kjt)
    expected = naive_rewrite(kjt, plan, list(NUMS))
    assert got.keys() == list(expected)
    for key, jt in got.to_dict().items():
        for (ids, weights), row_ids, row_weights in zip(expected[key], jt.to_dense(), jt.to_dense_weights()):
            assert torch.equal(ids, row_ids) and torch.equal(weights, row_weights)
    for f, key in enumerate(NUMS):  # past the last group of the first, a middle or the last feature
        ids = torch.zeros(len(NUMS), 2, dtype=torch.int64)
        ids[f, 1] = NUMS[key]
        with pytest.raises(ValueError, match=f"id {NUMS[key]} is outside"):
            KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), ids))


def runs_plan() -> StructuredPlan:
    """Feature "a": groups that merge into one segment (ids 0-4, 36-41), a narrow group
    before a wide one (5-6, 7-9: two runs in slab a:4-8), a group of shared rows right
    after a group as wide (10-15, with the shift of 7-9 into both slabs), dropped groups
    between kept ones (16-18) and at the end (42-45), two groups of shared rows side by
    side (19-25, 26-35); "b" keeps nothing; "c" is one segment of two groups."""
    def group(key, start, stop, width, buckets=None):
        return GroupPlan(Group(key, 0, start, stop), tuple(range(width)), buckets=buckets)

    return StructuredPlan((
        group("a", 0, 2, 8), group("a", 2, 5, 8), group("a", 5, 7, 4), group("a", 7, 10, 8),
        group("a", 10, 16, 8, buckets=2), group("a", 16, 18, 0), group("a", 18, 19, 0),
        group("a", 19, 26, 4, buckets=3), group("a", 26, 36, 8, buckets=4), group("a", 36, 40, 4),
        group("a", 40, 42, 4), group("a", 42, 46, 0),
        group("b", 0, 3, 0), group("b", 3, 6, 0), group("c", 0, 5, 4), group("c", 5, 9, 4),
    ), embedding_dim=K, tau=0.0)


def alternating_plan(groups: int) -> StructuredPlan:
    """One feature of ``groups`` one-id groups, widths 4 and 8 in turn: a segment each."""
    return StructuredPlan(tuple(
        GroupPlan(Group("a", 0, i, i + 1), tuple(range(4 + 4 * (i % 2)))) for i in range(groups)
    ), embedding_dim=K, tau=0.0)


def assert_rewrites_alike(plan: StructuredPlan, keys: list[str], ids: torch.Tensor) -> None:
    """``SingleHotKeyRewriter`` gives ``KeyRewriter``'s KJT of ``ids`` (the bags path, and
    ``KeyRewriter`` itself, which hands a single-hot batch to it), without weights and with."""
    rewriter, key_rewriter = SingleHotKeyRewriter(plan, keys), KeyRewriter(plan, keys)
    for weights in (None, torch.rand(ids.shape, generator=torch.Generator().manual_seed(ids.shape[1]))):
        kjt = single_hot_kjt(keys, ids, weights)
        expected = key_rewriter.rewrite_bags(kjt)
        for got in (rewriter(ids, weights), key_rewriter(kjt)):
            assert got.keys() == expected.keys() and got.stride() == expected.stride() == ids.shape[1]
            for part in ("values", "lengths", "weights_or_none"):
                mine, theirs = getattr(got, part)(), getattr(expected, part)()
                assert (mine is None and theirs is None) or torch.equal(mine, theirs.to(mine.dtype)), part


@pytest.mark.parametrize("rows", [1, 7, COMPARE_ROWS - 1, COMPARE_ROWS, 300])
def test_single_hot_key_rewriter_merges_groups_into_segments_and_rewrites_every_id_as_the_key_rewriter(rows):
    plan, keys = runs_plan(), ["a", "b", "c"]
    rewriter = SingleHotKeyRewriter(plan, keys)
    # a: 0-4 one segment, then 5, 7, each group of shared rows, the dropped 16-18, 36-41, the dropped tail.
    assert rewriter.bounds[0, :10].tolist() == [0, 5, 7, 10, 16, 19, 26, 36, 42, 46]
    assert rewriter.bounds[2, :2].tolist() == [0, 9] and rewriter.bounds[1, 0] == 0
    stops = [46, 6, 9]
    # Every id of every feature (so every segment's first and last), batch after batch of `rows`.
    ids = torch.stack([torch.arange(max(stops) * 8) % stop for stop in stops])
    for start in range(0, ids.shape[1], rows):
        assert_rewrites_alike(plan, keys, ids[:, start : start + rows].contiguous())
    for f, stop in enumerate(stops):  # past the last group of the first, a middle or the last feature
        for bad in (stop, -1):
            wrong = torch.zeros(len(keys), rows, dtype=torch.int64)
            wrong[f, rows // 2] = bad
            with pytest.raises(ValueError, match=f"id {bad} is outside"):
                rewriter(wrong)


@pytest.mark.parametrize("groups", [COMPARE_BOUNDS // 2, 2 * COMPARE_BOUNDS])
def test_single_hot_key_rewriter_of_a_feature_with_a_segment_per_group(groups):
    plan = alternating_plan(groups)
    assert SingleHotKeyRewriter(plan, ["a"]).bounds.shape[1] == groups + 1
    for rows in (1, 300):
        ids = torch.randint(0, groups, (1, rows), generator=torch.Generator().manual_seed(rows))
        assert_rewrites_alike(plan, ["a"], ids)


def test_the_key_rewriter_hands_single_hot_batches_in_key_order_to_the_single_hot_rewriter(monkeypatch):
    _, plan = searched()
    rewriter = KeyRewriter(plan, list(NUMS))
    single_hot = single_hot_kjt(list(NUMS), random_ids(3))
    expected = rewriter(single_hot)

    def bags_path(features):
        raise AssertionError("took the bags path")

    monkeypatch.setattr(rewriter, "rewrite_bags", bags_path)
    assert torch.equal(rewriter(single_hot).values(), expected.values())
    reordered = single_hot_kjt(list(NUMS)[::-1], random_ids(3).flip(0))
    for other in (multi_hot_batch(4), reordered):
        with pytest.raises(AssertionError, match="bags path"):
            rewriter(other)
