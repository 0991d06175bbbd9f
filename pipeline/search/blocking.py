"""Frequency blocking of features (DNIS paper, section 2.3): choosing the cut points.

All features of all fields are sorted by train frequency and cut into ``L`` blocks.
Because ids are frequency ranks, a field's features in block ``l`` form one id range,
so a field needs only ``L-1`` cut points and ``block = bucketize(id, cuts, right=True)``.

Ties are ordered by (count descending, field order, id), the order in which the
preprocessing assigned ranks, so blocks are id ranges inside every field. The work is
done on run-length encoded counts (a few thousand runs per field), never on per-id
arrays, so blocking tens of millions of ids is instant. The ``Blocking`` it returns
lives in ``plans.blocking`` (``sharding/`` reads it too).

Example:
    >>> b = compute_blocking({"a": [[10, 2], [1, 4]], "b": [[5, 2]]}, num_blocks=2)
    >>> b.cuts
    {'a': [2], 'b': [2]}
    >>> b.block_of("a", [0, 1, 2, 5]).tolist()
    [0, 0, 1, 1]
"""

from __future__ import annotations

import numpy as np

from plans.blocking import Blocking

MODES = ("equal_count", "equal_mass")


def compute_blocking(
    counts: dict[str, list[list[int]]],
    num_blocks: int,
    mode: str = "equal_count",
    per_field: bool = False,
) -> Blocking:
    """Cut features into ``num_blocks`` frequency blocks.

    Args:
        counts: per feature key (in α-EBC field order), RLE train counts by id
            (``[[count, run_length], ...]``, non-increasing; see ``metadata.encode_counts``).
        num_blocks: ``L``.
        mode: ``equal_count`` (each block holds ~N/L features) or ``equal_mass``
            (each block holds ~1/L of all occurrences, so frequent blocks are small).
        per_field: block each field on its own, giving it its own ``L`` α rows.

    Returns:
        The ``Blocking``; empty blocks are possible (e.g. a field of 3 ids with L=6).
    """
    if mode not in MODES:
        raise ValueError(f"blocking mode {mode!r}: expected one of {MODES}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    keys = tuple(counts)
    groups = [[k] for k in keys] if per_field else [list(keys)]
    cuts: dict[str, list[int]] = {}
    features, mass = [], []
    for group in groups:
        group_cuts, group_features, group_mass = _block_group(
            {k: counts[k] for k in group}, num_blocks, mode
        )
        cuts.update(group_cuts)
        features += group_features
        mass += group_mass
    return Blocking(keys, cuts, num_blocks, per_field, tuple(features), tuple(mass))


def _block_group(
    counts: dict[str, list[list[int]]], num_blocks: int, mode: str
) -> tuple[dict[str, list[int]], list[int], list[int]]:
    """Block the features of several fields together; returns cuts, features and mass per block."""
    runs = _sorted_runs(counts)  # columns: count, length, field index, first id
    lengths = runs[:, 1]
    mass = runs[:, 0] * lengths
    cum_len = np.r_[0, np.cumsum(lengths)]
    cum_mass = np.r_[0, np.cumsum(mass)]
    total_len, total_mass = int(cum_len[-1]), int(cum_mass[-1])
    # Global positions (in the sorted feature list) where blocks 1..L-1 start.
    boundaries = []
    for b in range(1, num_blocks):
        if mode == "equal_count":
            boundaries.append(int(round(b * total_len / num_blocks)))
        else:
            boundaries.append(_mass_position(runs, cum_len, cum_mass, b * total_mass / num_blocks))
    boundaries = np.maximum.accumulate(np.asarray(boundaries, dtype=np.int64))
    names = list(counts)
    cuts = {k: [] for k in names}
    for pos in boundaries:
        for field, k in enumerate(names):
            cuts[k].append(_ids_before(runs, cum_len, field, int(pos)))
    edges = np.r_[0, boundaries, total_len]
    block_features = np.diff(edges).tolist()
    block_mass = np.diff([_mass_before(runs, cum_len, cum_mass, int(p)) for p in edges]).tolist()
    return cuts, block_features, block_mass


def _sorted_runs(counts: dict[str, list[list[int]]]) -> np.ndarray:
    rows = []
    for field, rle in enumerate(counts.values()):
        first = 0
        previous = None
        for count, length in rle:
            if previous is not None and count > previous:
                raise ValueError(f"counts of field #{field} are not non-increasing in the id")
            rows.append((count, length, field, first))
            first += length
            previous = count
    runs = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    order = np.lexsort((runs[:, 3], runs[:, 2], -runs[:, 0]))
    return runs[order]


def _mass_position(runs, cum_len, cum_mass, target: float) -> int:
    """Smallest global position whose prefix mass reaches ``target``."""
    r = int(np.searchsorted(cum_mass, target, side="left")) - 1
    r = min(max(r, 0), len(runs) - 1)
    inside = int(np.ceil((target - cum_mass[r]) / max(runs[r, 0], 1)))
    return int(cum_len[r] + min(max(inside, 0), runs[r, 1]))


def _mass_before(runs, cum_len, cum_mass, pos: int) -> int:
    r = int(np.searchsorted(cum_len, pos, side="right")) - 1
    if r >= len(runs):
        return int(cum_mass[-1])
    return int(cum_mass[r] + (pos - cum_len[r]) * runs[r, 0])


def _ids_before(runs, cum_len, field: int, pos: int) -> int:
    """How many ids of ``field`` lie before global position ``pos``."""
    mine = runs[:, 2] == field
    whole = mine & (cum_len[1:] <= pos)
    partial = mine & (cum_len[:-1] < pos) & (cum_len[1:] > pos)
    return int(runs[whole, 1].sum() + (pos - cum_len[:-1][partial]).sum())
