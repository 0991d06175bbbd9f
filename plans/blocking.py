"""Frequency blocking of features (DNIS paper, section 2.3): cut points per field and
the α rows they index.

All features of all fields are sorted by train frequency and cut into ``L`` blocks.
Because ids are frequency ranks, a field's features in block ``l`` form one id range,
so a field needs only ``L-1`` cut points and ``block = bucketize(id, cuts, right=True)``.
``pipeline.search.blocking.compute_blocking`` chooses the cuts from train counts.

Example:
    >>> b = Blocking(("a", "b"), {"a": [2], "b": [2]}, num_blocks=2, per_field=False,
    ...              block_features=(4, 4), block_mass=(30, 4))
    >>> b.block_of("a", [0, 1, 2, 5]).tolist(), b.num_alpha_rows
    ([0, 0, 1, 1], 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Blocking:
    """Cut points per feature key and the shape of the α matrix they index.

    Attributes:
        keys: feature keys, in the order of the α-EBC's fields.
        cuts: per key, ``L-1`` non-decreasing ids; block ``l`` holds ids in
            ``[cuts[l-1], cuts[l])`` (``cuts[-1] = 0``, ``cuts[L-1] = vocab size``).
        num_blocks: ``L``.
        per_field: whether every field has its own ``L`` α rows.
        block_features / block_mass: features and occurrences per α row.
    """

    keys: tuple[str, ...]
    cuts: dict[str, list[int]]
    num_blocks: int
    per_field: bool
    block_features: tuple[int, ...]
    block_mass: tuple[int, ...]

    @property
    def num_alpha_rows(self) -> int:
        """Rows of α: ``L``, or ``F * L`` with per-field blocking."""
        return self.num_blocks * (len(self.keys) if self.per_field else 1)

    def row_offset(self, key: str) -> int:
        """First α row of ``key``'s blocks."""
        return self.keys.index(key) * self.num_blocks if self.per_field else 0

    def block_of(self, key: str, ids) -> np.ndarray:
        """α row of each id of ``key``."""
        local = np.searchsorted(np.asarray(self.cuts[key]), np.asarray(ids), side="right")
        return local + self.row_offset(key)

    def to_json(self) -> dict:
        """Plain dict for run directories and reports."""
        return {
            "keys": list(self.keys),
            "cuts": self.cuts,
            "num_blocks": self.num_blocks,
            "per_field": self.per_field,
            "block_features": list(self.block_features),
            "block_mass": list(self.block_mass),
        }

    @classmethod
    def from_json(cls, doc: dict) -> "Blocking":
        return cls(
            keys=tuple(doc["keys"]),
            cuts={k: list(v) for k, v in doc["cuts"].items()},
            num_blocks=doc["num_blocks"],
            per_field=doc["per_field"],
            block_features=tuple(doc["block_features"]),
            block_mass=tuple(doc["block_mass"]),
        )
