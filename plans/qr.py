"""The quotient-remainder (QR) baseline's table sizes and their bytes.

QR compositional embeddings (Shi et al., KDD 2020) replace a table of ``n`` rows by a
remainder table of ``m`` rows (``id % m``) and a quotient table of ``ceil(n / m)`` rows
(``id // m``); id ``i`` embeds to ``e_q[i // m] ⊙ e_r[i % m]``. Serving stores both
tables at full width ``K`` in fp32 and nothing else (``m`` is a constant of the model),
so a QR table costs ``(m + ceil(n / m)) × K × 4`` bytes; every other table stays full
(``n × K × 4``). CR = unpruned bytes ÷ QR bytes, as for every method (DESIGN.md).
``pipeline.search.qr.plan_qr`` chooses the remainders for a target CR.

Example:
    >>> plan = QRPlan({"big": 10_000, "small": 10}, embedding_dim=4, remainders={"big": 468})
    >>> plan.table_rows("big"), plan.table_rows("small"), round(plan.compression_ratio(), 2)
    (490, 10, 20.02)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plans.bytes import VALUE_BYTES, unpruned_bytes


def qr_rows(num_embeddings: int, remainder: int) -> int:
    """Rows stored for a table of ``num_embeddings`` ids under QR with ``remainder`` rows."""
    return remainder + -(-num_embeddings // remainder)


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
