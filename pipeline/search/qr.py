"""The quotient-remainder (QR) baseline's table sizes, chosen to hit a byte budget.

QR compositional embeddings (Shi et al., KDD 2020) replace a table of ``n`` rows by a
remainder table of ``m`` rows (``id % m``) and a quotient table of ``ceil(n / m)`` rows
(``id // m``); id ``i`` embeds to ``e_q[i // m] ⊙ e_r[i % m]``. Serving stores both
tables at full width ``K`` in fp32 and nothing else (``m`` is a constant of the model),
so a QR table costs ``(m + ceil(n / m)) × K × 4`` bytes; every other table stays full
(``n × K × 4``). CR = unpruned bytes ÷ QR bytes, as for every method (DESIGN.md).

Example:
    >>> plan = plan_qr({"big": 10_000, "small": 10}, embedding_dim=4, min_rows=100, target_cr=20.0)
    >>> plan.remainders, plan.table_rows("big"), plan.compression_ratio() >= 20.0
    ({'big': 468}, 490, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.prune.bytes import VALUE_BYTES, unpruned_bytes


def qr_rows(num_embeddings: int, remainder: int) -> int:
    """Rows stored for a table of ``num_embeddings`` ids under QR with ``remainder`` rows."""
    return remainder + -(-num_embeddings // remainder)


def smallest_remainder(num_embeddings: int) -> int:
    """The remainder count of fewest stored rows, ``ceil(sqrt(n))``: ``m + ceil(n/m)`` only
    grows as ``m`` grows past it (the quotient loses at most one row per extra remainder
    row there), which makes the budget search below monotone."""
    return math.isqrt(num_embeddings - 1) + 1


@dataclass(frozen=True)
class QRPlan:
    """Which tables are QR (their remainder count ``m``); the rest stay full.

    Attributes:
        num_embeddings: rows of every feature's full table, in field order.
        embedding_dim: ``K``, the width of every table.
        remainders: ``m`` per QR feature; absent features keep their full table.
    """

    num_embeddings: dict[str, int]
    embedding_dim: int
    remainders: dict[str, int] = field(default_factory=dict)

    def table_rows(self, key: str) -> int:
        """Rows stored for ``key``: both QR tables, or the full table."""
        n = self.num_embeddings[key]
        return qr_rows(n, self.remainders[key]) if key in self.remainders else n

    def embedding_bytes(self) -> int:
        """Serving bytes of all tables (fp32, width ``K``)."""
        return sum(self.table_rows(k) for k in self.num_embeddings) * self.embedding_dim * VALUE_BYTES

    def unpruned_bytes(self) -> int:
        return unpruned_bytes(sum(self.num_embeddings.values()), self.embedding_dim)

    def compression_ratio(self) -> float:
        return self.unpruned_bytes() / self.embedding_bytes()

    def bytes_record(self) -> dict:
        """What a run's ``result.json`` records about its embedding size."""
        return {
            "embedding": "qr", "embedding_bytes": self.embedding_bytes(),
            "unpruned_bytes": self.unpruned_bytes(), "compression_ratio": self.compression_ratio(),
            "qr_remainders": dict(self.remainders),
        }


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
