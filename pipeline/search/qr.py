"""The quotient-remainder (QR) baseline's table sizes, chosen to hit a byte budget.

What a QR table stores and costs, and the ``QRPlan`` that records the sizes, are in
``plans.qr``.

Example:
    >>> plan = plan_qr({"big": 10_000, "small": 10}, embedding_dim=4, min_rows=100, target_cr=20.0)
    >>> plan.remainders, plan.table_rows("big"), plan.compression_ratio() >= 20.0
    ({'big': 468}, 490, True)
"""

from __future__ import annotations

import math

from plans.qr import QRPlan, qr_rows


def smallest_remainder(num_embeddings: int) -> int:
    """The remainder count of fewest stored rows, ``ceil(sqrt(n))``: ``m + ceil(n/m)`` only
    grows as ``m`` grows past it (the quotient loses at most one row per extra remainder
    row there), which makes the budget search below monotone."""
    return math.isqrt(num_embeddings - 1) + 1


def plan_qr(num_embeddings: dict[str, int], embedding_dim: int, min_rows: int, target_cr: float) -> QRPlan:
    """Remainder counts whose bytes stay within ``unpruned / target_cr`` and land as close
    to it as one row of one table allows.

    One global collision count ``c`` (ids per remainder row, ``m = ceil(n / c)``) for
    every table above ``min_rows`` rows, bisected to the smallest ``c`` that fits; then
    the largest tables take back, one by one, what ``c - 1`` would have given them while
    the budget allows. A table stays full where QR would not save a row.

    Raises:
        ValueError: ``target_cr`` is out of reach, naming the highest reachable CR.
    """
    if target_cr <= 1.0:
        raise ValueError(f"target CR must be > 1, got {target_cr}")
    candidates = {k: n for k, n in num_embeddings.items() if n > min_rows}
    total = sum(num_embeddings.values())
    budget = int(total // target_cr)  # rows; bytes are rows × K × 4 for every table
    if (budget + 1) * target_cr <= total:  # total / target_cr rounded down past an exact fit
        budget += 1
    fixed = total - sum(candidates.values())

    def remainder(n: int, collisions: int) -> int:
        return max(-(-n // collisions), smallest_remainder(n))

    def rows(n: int, m: int) -> int:
        return min(n, qr_rows(n, m))

    def used(ms: dict[str, int]) -> int:
        return fixed + sum(rows(candidates[k], m) for k, m in ms.items())

    def at(collisions: int) -> dict[str, int]:
        return {k: remainder(n, collisions) for k, n in candidates.items()}

    most = max(candidates.values(), default=1)
    if used(at(most)) > budget:
        best = total / used(at(most))
        raise ValueError(
            f"target CR {target_cr:g} is out of reach with qr_min_rows={min_rows}: "
            f"the highest reachable CR is {best:.4g}"
        )
    lo, hi = 1, most  # used(at(c)) never grows with c; find the smallest c that fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if used(at(mid)) <= budget else (mid + 1, hi)
    chosen = at(lo)
    if lo > 1:
        looser = at(lo - 1)
        for key in sorted(candidates, key=candidates.get, reverse=True):
            small, big = chosen[key], looser[key]
            while small < big:  # the largest m of this table that still fits
                mid = (small + big + 1) // 2
                if used({**chosen, key: mid}) <= budget:
                    small = mid
                else:
                    big = mid - 1
            chosen[key] = small
    remainders = {k: m for k, m in chosen.items() if qr_rows(candidates[k], m) < candidates[k]}
    return QRPlan(dict(num_embeddings), embedding_dim, remainders)
