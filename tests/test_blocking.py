"""Feature blocking: cut points from RLE counts, checked by hand and against a brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.metadata import encode_counts
from pipeline.search.blocking import compute_blocking
from plans.blocking import Blocking

COUNTS = {"a": [[10, 2], [1, 4]], "b": [[5, 2]]}  # a: 10 10 1 1 1 1, b: 5 5


def test_equal_count_and_equal_mass_cuts_by_hand():
    b = compute_blocking(COUNTS, num_blocks=2)
    # sorted: a0 a1 b0 b1 | a2..a5  -> 4 and 4 features
    assert b.cuts == {"a": [2], "b": [2]} and b.block_features == (4, 4)
    m = compute_blocking(COUNTS, num_blocks=3, mode="equal_mass")
    # mass 34, a third each: [a0 a1] 20 | [b0] 5 | [b1 a2..a5] 9
    assert m.cuts == {"a": [2, 2], "b": [0, 1]}
    assert m.block_features == (2, 1, 5) and m.block_mass == (20, 5, 9)


def test_per_field_blocking_gives_each_field_its_own_alpha_rows():
    b = compute_blocking(COUNTS, num_blocks=2, per_field=True)
    assert b.cuts == {"a": [3], "b": [1]}
    assert b.num_alpha_rows == 4
    assert b.block_of("a", [0, 5]).tolist() == [0, 1]
    assert b.block_of("b", [0, 1]).tolist() == [2, 3]


@pytest.mark.parametrize("mode", ["equal_count", "equal_mass"])
def test_cuts_match_brute_force_sort(mode):
    rng = np.random.default_rng(0)
    counts = {f"f{i}": np.sort(rng.zipf(1.3, size=rng.integers(1, 400)))[::-1] for i in range(5)}
    L = 6
    b = compute_blocking({k: encode_counts(v) for k, v in counts.items()}, L, mode)
    # Brute force: every feature as (count, field, id), sorted like the ranks were assigned.
    feats = sorted(
        ((-int(c), f, i) for f, (k, v) in enumerate(counts.items()) for i, c in enumerate(v))
    )
    total = len(feats)
    mass = np.cumsum([-c for c, _, _ in feats])
    for block in range(1, L):
        if mode == "equal_count":
            start = round(block * total / L)
        else:
            start = int(np.searchsorted(mass, block * mass[-1] / L, side="left")) + 1
        # ids of each field before the block's start position form its cut point
        for f, key in enumerate(counts):
            before = sum(1 for _, ff, _ in feats[:start] if ff == f)
            assert b.cuts[key][block - 1] == before, (mode, block, key)
    assert sum(b.block_features) == total
    assert sum(b.block_mass) == int(mass[-1])


def test_blocking_round_trips_through_json():
    b = compute_blocking(COUNTS, num_blocks=3, mode="equal_mass")
    assert Blocking.from_json(b.to_json()) == b


def test_rejects_counts_that_are_not_frequency_ranked():
    with pytest.raises(ValueError, match="non-increasing"):
        compute_blocking({"a": [[1, 2], [5, 1]]}, num_blocks=2)
