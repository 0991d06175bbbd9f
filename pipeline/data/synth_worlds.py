"""What a synthetic world plants: latent dims by frequency rank, and the frequency law.

The worlds share Criteo's 26 categorical fields (``CATEGORICALS``: vocabulary size,
missing rate, Zipf exponent; a world may set its own) and the generator of
``pipeline.data.synth``; a ``World`` says how each field's frequency law is bent and
how many latent dims a value of rank ``r`` (0 = most frequent) carries.

- ``longtail`` (the default): Criteo's vocabularies (up to 200k) and steep Zipf tails
  (exponents 1.05-1.5); dims 16 / 8 / 4 / 2 / 1 / 0 for ranks [0, 8) / [8, 64) /
  [64, 512) / [512, 4096) / [4096, 32768) / beyond. Rare values need few dims and the
  rarest none: a free tail that a structured prune drops at no cost.
- ``flat``: every value of every field carries 4 latent dims, whatever its rank, plus its
  first-order weight. 4 is the narrowest width the repack ships (widths are multiples of
  4), so the right answer is "width 4 everywhere": no (field, block) can be dropped or
  narrowed without losing signal. For tail ids to be learnable they must be seen, so
  vocabularies are capped at 20k (before ``vocab_scale``) and Zipf exponents multiplied
  by 0.6 (0.63-0.9): in 800k train rows every id is seen >= 3 times and 68% of ids >= 20
  times, 40% of occurrences fall past rank 512 and 18% past rank 4096 (longtail: 18% of
  the vocabulary seen >= 3 times, 3% >= 20 times, 17% and 8% of occurrences past 512
  and 4096). ``vocab_scale`` applies after the cap, so rows / vocab_scale sets how often
  an id is seen in either world.

- ``ratings``: a rating log turned into clicks, shaped like MovieLens-1M: C1 users
  (6,040 values), C2 items (3,706, a steeper law), every other field (and every integer
  field) empty in every row; 8 latent dims for every user and item. Every id carries
  signal, and 37 constant fields hold most of the occurrences.

A ``HeavyTail`` (optional, any world) adds to one field millions of extra values
that carry no label signal, the way a Criteo Terabyte day holds tens of millions of
values seen once: with probability ``rate`` a row's value is replaced by tail rank
``vocab + x``, ``x`` drawn from a power law over ``[0, values)`` (exponent ``zipf``:
0 is uniform; 0.5 gives a head of repeated values and a tail of singletons). Ranks
only: no table grows with ``values``.

Example:
    >>> WORLDS["flat"].latent_dims(np.array([0, 100, 5000, 40000])).tolist()
    [4, 4, 4, 4]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

LATENT_DIM = 16
# Per categorical field: (vocabulary size, missing rate, Zipf exponent); sizes follow
# Criteo Kaggle, capped at 200k.
CATEGORICALS: tuple[tuple[int, float, float], ...] = (
    (1460, 0.0, 1.20), (583, 0.0, 1.15), (200000, 0.03, 1.05), (150000, 0.03, 1.10),
    (305, 0.0, 1.30), (24, 0.12, 1.40), (12517, 0.0, 1.10), (633, 0.0, 1.25),
    (3, 0.0, 1.50), (93145, 0.0, 1.05), (5683, 0.0, 1.15), (180000, 0.03, 1.05),
    (3194, 0.0, 1.15), (27, 0.0, 1.30), (14992, 0.0, 1.10), (160000, 0.03, 1.05),
    (10, 0.0, 1.40), (5652, 0.0, 1.15), (2173, 0.44, 1.20), (4, 0.44, 1.50),
    (170000, 0.03, 1.05), (18, 0.76, 1.40), (15, 0.0, 1.30), (120000, 0.03, 1.10),
    (105, 0.44, 1.30), (142572, 0.44, 1.10),
)


@dataclass(frozen=True)
class World:
    """A planted world: latent dims per frequency tier and the value-frequency law.

    Args:
        name: what ``--world`` calls it.
        tiers: ``(first rank past the tier, latent dims of the tier)``, ranks ascending.
        dims_past_tiers: latent dims of ranks past the last tier.
        vocab_cap: cap on each field's vocabulary before ``vocab_scale`` (None: none).
        zipf_factor: multiplies each field's Zipf exponent (< 1: a flatter law).
        categoricals: per categorical field ``(vocabulary size, missing rate, Zipf
            exponent)``; Criteo's by default.
        integers_missing: every integer field empty in every row.
    """

    name: str
    tiers: tuple[tuple[int, int], ...]
    dims_past_tiers: int
    vocab_cap: Optional[int]
    zipf_factor: float
    categoricals: tuple[tuple[int, float, float], ...] = CATEGORICALS
    integers_missing: bool = False

    def __post_init__(self) -> None:
        if len(self.categoricals) != len(CATEGORICALS):
            raise ValueError(f"world {self.name}: {len(self.categoricals)} categorical fields, "
                             f"the Criteo format has {len(CATEGORICALS)}")
        # The power-law inverse CDF divides by 1 - s.
        if any(s * self.zipf_factor == 1.0 for *_, s in self.categoricals):
            raise ValueError(f"world {self.name}: a Zipf exponent of exactly 1")
        if max(self.dims(), default=0) > LATENT_DIM:
            raise ValueError(f"world {self.name}: more than {LATENT_DIM} latent dims")

    def dims(self) -> list[int]:
        """Latent dims of each tier, then of the ranks past the last one."""
        return [d for _, d in self.tiers] + [self.dims_past_tiers]

    def latent_dims(self, ranks: np.ndarray) -> np.ndarray:
        """Planted latent dims ``d(r)`` of values of rank ``ranks`` (any field).

        >>> WORLDS["longtail"].latent_dims(np.array([0, 7, 8, 100, 1000, 5000, 40000])).tolist()
        [16, 16, 8, 4, 2, 1, 0]
        """
        bounds = np.array([b for b, _ in self.tiers])
        return np.array(self.dims())[np.searchsorted(bounds, ranks, side="right")]

    def widest(self, lo: int, hi: Optional[int] = None) -> int:
        """Most latent dims of any rank in ``[lo, hi)`` (``hi`` None: no end)."""
        starts = [0] + [b for b, _ in self.tiers]
        ends = [b for b, _ in self.tiers] + [None]
        return max((d for s, e, d in zip(starts, ends, self.dims())
                    if (e is None or e > lo) and (hi is None or s < hi)), default=0)

    def latent_end(self) -> Optional[int]:
        """First rank past which no value has latent dims (None: every rank has some)."""
        if self.dims_past_tiers:
            return None
        nonzero = [b for b, d in self.tiers if d]
        return nonzero[-1] if nonzero else 0

    def frequency_law(self, vocab_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-field vocabulary sizes and Zipf exponents at ``vocab_scale``."""
        sizes = [v if self.vocab_cap is None else min(v, self.vocab_cap) for v, _, _ in self.categoricals]
        vocab = np.array([max(3, round(v * vocab_scale)) for v in sizes], np.int32)
        return vocab, np.array([s * self.zipf_factor for _, _, s in self.categoricals])

    def missing_rates(self) -> np.ndarray:
        """Per categorical field, the share of rows where it is empty."""
        return np.array([m for _, m, _ in self.categoricals])


@dataclass(frozen=True)
class HeavyTail:
    """Extra values planted in one categorical field (see the module docstring).

    Args:
        field: the field, ``C1`` .. ``C26``.
        rate: share of rows whose value is a tail value, in (0, 1].
        values: how many tail values there are (ranks ``vocab .. vocab + values - 1``).
        zipf: power-law exponent of the tail values, in [0, 1) (0: uniform).

    Example:
        >>> tail = HeavyTail("C1", rate=1.0, values=10**9, zipf=0.0)
        >>> ranks = np.zeros((4, 26), np.int32)
        >>> tail.plant(ranks, np.full(26, 100), np.random.default_rng(0))
        >>> bool((ranks[:, 0] >= 100).all() and (ranks[:, 1:] == 0).all())
        True
    """

    field: str
    rate: float
    values: int
    zipf: float = 0.5

    def __post_init__(self) -> None:
        names = [f"C{i + 1}" for i in range(len(CATEGORICALS))]
        if self.field not in names:
            raise ValueError(f"heavy tail field {self.field!r}: choose one of C1..C{len(names)}")
        if not 0 < self.rate <= 1:
            raise ValueError(f"heavy tail rate must lie in (0, 1], got {self.rate}")
        if not 1 <= self.values < 2**31:
            raise ValueError(f"heavy tail values must lie in [1, 2^31), got {self.values}")
        if not 0 <= self.zipf < 1:
            raise ValueError(f"heavy tail zipf exponent must lie in [0, 1), got {self.zipf}")

    @property
    def column(self) -> int:
        return int(self.field[1:]) - 1

    def plant(self, ranks: np.ndarray, vocab: np.ndarray, rng: np.random.Generator) -> None:
        """Replace a ``rate`` share of ``ranks[:, column]`` (in place) by tail ranks."""
        hit = rng.random(len(ranks)) < self.rate
        u = rng.random(int(hit.sum()))
        # inverse CDF of a continuous power law on [1, values + 1), in float64: float32
        # would round ranks past 2^24 and lose most of the distinct values
        one_minus_s = 1.0 - self.zipf
        x = (1.0 + u * ((self.values + 1.0) ** one_minus_s - 1.0)) ** (1.0 / one_minus_s)
        ranks[hit, self.column] = vocab[self.column] + np.minimum(x.astype(np.int64) - 1, self.values - 1)


_TIER_BOUNDS = (8, 64, 512, 4096, 32768)
# A rating log turned into clicks, shaped like MovieLens-1M: C1 users (6,040), C2 items
# (3,706, a steeper popularity law), every other field empty in every row.
_RATINGS = ((6040, 0.0, 0.5), (3706, 0.0, 0.65)) + ((3, 1.0, 1.5),) * (len(CATEGORICALS) - 2)
WORLDS = {
    "longtail": World("longtail", tuple(zip(_TIER_BOUNDS, (16, 8, 4, 2, 1))), 0, None, 1.0),
    "flat": World("flat", tuple(zip(_TIER_BOUNDS, (4,) * 5)), 4, 20000, 0.6),
    "ratings": World("ratings", (), 8, None, 1.0, _RATINGS, integers_missing=True),
}
