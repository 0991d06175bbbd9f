"""Synthetic Criteo-format click logs with a planted embedding-dimension signal.

Rows look like Criteo's (``label \\t I1..I13 \\t C1..C26``, LF): 26 categorical fields
with vocabularies from 3 to 200k values (``vocab_scale`` multiplies them), truncated
power-law (Zipf) value frequencies, Criteo-like missing rates (0% for most fields,
~45% for C19/C20/C25/C26, 76% for C22), 13 integer fields drawn from heavy-tailed
log-normals with their own missing rates and a few negatives (I2). A categorical value
is identified by its *frequency rank* ``r`` in its field (0 = most frequent); its
8-hex text is a seeded bijection of ``(field, r)``, so hex order says nothing about r.

The label model (the point of the generator)::

    logit = b + a1 * sum_f w[f, r_f] + a2 * sum_{f<g} <v[f, r_f], v[g, r_g]> + a3 * sum_m c_m log1p(x_m)
    label ~ Bernoulli(sigmoid(logit))

- ``w`` are first-order weights, N(0, 1) for every value; ``v`` are latent vectors of
  ``LATENT_DIM`` = 16 dims of which only the first ``d(r)`` are non-zero, N(0, 1).
  The *world* (``--world``, ``pipeline.data.synth_worlds``) sets ``d(r)`` and the
  frequency law. ``longtail`` (default): ``d = 16`` for ranks [0, 8), 8 for [8, 64),
  4 for [64, 512), 2 for [512, 4096), 1 for [4096, 32768), 0 beyond, so frequent values
  need many embedding dimensions, rare ones one or two, the rarest none: what DNIS
  searches. ``flat``: ``d = 4`` for every value, vocabularies capped at 20k and a
  flatter Zipf law, so every id carries signal and is seen often enough to learn it.
  ``ratings``: users (C1) and items (C2) only, ``d = 8`` each, every other field empty.
- Missing values contribute nothing; ``c_m`` is non-zero for I1, I6, I11 only.
- ``a1, a2, a3`` are calibrated on a fixed sample so the three terms have standard
  deviations ``TERM_STD`` (0.6, 2.2, 0.4), and ``b`` so the mean CTR is 0.25.

Measured (seed 0, 200k train rows, 2 epochs, Adam 3e-3): the true logit scores AUC 0.90;
an FM+MLP reaches AUC 0.66 / 0.70 / 0.76 with K = 2 / 4 / 16, logistic regression 0.66.
Through ``dnis-preprocess`` (200k rows, ``--vocab-scale 0.2``), the project's DeepFM
(K = 16, paper dense mode, Adam 3e-3, batch 1024) scores test AUC 0.73 after one epoch.

Measured, flat vs longtail (seed 0, 1M rows, 800,550 train rows after ``dnis-preprocess``):
one core writes 1M rows in 3.5 s (~290k rows/s) in either world; every flat id is seen
>= 3 times in train (100% of its 207k ids and of occurrences; 68% of ids >= 20 times)
against 34% of the 661k longtail ids that occur at all (97% of occurrences: the Zipf
head holds the mass). With the true parameters (30k rows), zeroing the latent vectors
of ranks >= 4096 costs the true logit (AUC 0.90) 0.004 AUC in longtail, 0.064 in flat.
The project's DeepFM (``configs/synthetic.yaml``, 1 rank, one epoch) scores test AUC
0.609 / 0.646 with K = 4 / 32 on flat (longtail 0.678 / 0.706); on 1M flat rows at
``--vocab-scale 0.2`` (5x the occurrences per id) 0.629 / 0.699, on 200k at 0.2 0.594 /
0.595. Flat is harder to learn (its signal sits on ids seen tens of times, not
thousands), and wider tables learn it faster though 4 dims represent it exactly.

``--tail-field`` plants a ``HeavyTail`` (``synth_worlds``): millions of extra values in
one field, no label signal, e.g. for the Terabyte layout's >= 5M distinct values.

Everything is a function of ``(seed, vocab_scale, world, tail)`` and the global row index:
rows are drawn in blocks of ``BLOCK_ROWS`` with a generator seeded by ``(seed, block)``, so the
output does not depend on how it is chunked or split into days. ``synth_truth.json``
records the world, fields, tiers (dims per rank range), scales and seed.

Example:
    $ dnis-synth --rows 1000000 --out runs/raw/synth.tsv
    $ dnis-synth --rows 1000000 --world flat --out runs/raw/flat.tsv
    $ dnis-synth --rows 1000000 --world ratings --out runs/raw/ratings.tsv
    $ dnis-synth --rows 24000000 --days 24 --gzip --out runs/raw/synth_1tb   # day_0.gz ...
    $ dnis-synth --rows 6000000 --days 24 --gzip --tail-field C1 --tail-rate 0.9 --out runs/raw/tb_tail
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.data.synth_worlds import CATEGORICALS, LATENT_DIM, WORLDS, HeavyTail, World

BLOCK_ROWS = 1 << 15
# Latent vectors live in two tables: ranks below HEAD_RANKS at the world's widest width,
# the rest at the widest width past it (2 in the longtail world), which saves memory.
HEAD_RANKS = 512
TERM_STD = {"first_order": 0.6, "pairwise": 2.2, "ints": 0.4}
TARGET_CTR = 0.25
CALIBRATION_ROWS = 20000
# Last word of the heavy tail's seed: a stream of its own, so rows without a tail keep their bytes.
TAIL_STREAM = 1 << 42
# Per integer field: (missing rate, mu, sigma of log(1+x), rate of negatives, label coef).
INTEGERS: tuple[tuple[float, float, float, float, float], ...] = (
    (0.45, 0.5, 1.2, 0.0, 0.6), (0.0, 3.0, 2.0, 0.1, 0.0), (0.21, 2.5, 1.5, 0.0, 0.0),
    (0.22, 1.8, 1.0, 0.0, 0.0), (0.03, 7.5, 2.5, 0.0, 0.0), (0.22, 3.5, 1.8, 0.0, -0.4),
    (0.04, 1.8, 1.6, 0.0, 0.0), (0.0, 2.5, 1.2, 0.0, 0.0), (0.04, 3.8, 1.6, 0.0, 0.0),
    (0.45, 0.5, 0.6, 0.0, 0.0), (0.04, 1.0, 1.0, 0.0, 0.5), (0.77, 0.3, 1.0, 0.0, 0.0),
    (0.22, 1.8, 1.2, 0.0, 0.0),
)
INT_WIDTH = 8  # chars per integer: log1p(x) is capped at 18, so 0 <= x < 1e8; negatives are small


@dataclass
class Rows:
    """Rows ``[start, stop)`` as arrays: ranks ``-1`` and ``ints_missing`` mark missing;
    ranks past a field's vocabulary are heavy-tail values."""

    labels: np.ndarray  # [n] uint8
    ints: np.ndarray  # [n, 13] int64
    ints_missing: np.ndarray  # [n, 13] bool
    ranks: np.ndarray  # [n, 26] int32
    logits: np.ndarray  # [n] float64, the true logit


class SyntheticCriteo:
    """The generator: tables drawn from ``seed``, rows drawn per block.

    Args:
        seed: every table and row derives from it.
        vocab_scale: multiplies every vocabulary size (after the world's cap).
        world: a name in ``WORLDS`` (``longtail``, ``flat`` or ``ratings``).
        tail: extra values planted in one field (None: none).

    Example:
        >>> gen = SyntheticCriteo(seed=0, vocab_scale=0.01, world="flat")
        >>> rows = gen.rows(0, 4)
        >>> len(gen.to_tsv(rows).splitlines())
        4
    """

    def __init__(self, seed: int = 0, vocab_scale: float = 1.0, world: str = "longtail",
                 tail: Optional[HeavyTail] = None) -> None:
        if vocab_scale <= 0:
            raise ValueError(f"vocab_scale must be positive, got {vocab_scale}")
        if world not in WORLDS:
            raise ValueError(f"unknown world {world!r}; choose from {sorted(WORLDS)}")
        self.seed = seed
        self.vocab_scale = vocab_scale
        self.world: World = WORLDS[world]
        self.vocab, self.zipf_s = self.world.frequency_law(vocab_scale)
        if self.vocab.astype(np.int64).sum() >= 2**31:
            raise ValueError(f"vocab_scale {vocab_scale}: more than 2^31 values in all")
        if tail is not None and int(self.vocab[tail.column]) + tail.values >= 2**31:
            raise ValueError(f"heavy tail of {tail.values} values: {tail.field} would pass 2^31 ranks")
        self.tail = tail
        self.cat_missing = self.world.missing_rates()
        # Per integer field, the share of rows where it is empty (all of them in the ratings world).
        self.int_missing = np.array([1.0 if self.world.integers_missing else p[0] for p in INTEGERS])
        rng = np.random.default_rng([seed, 1 << 40])
        self.hex_keys = rng.integers(0, 1 << 32, size=(len(CATEGORICALS), 2), dtype=np.uint32)
        self._build_tables(rng)
        self.scales = {"first_order": 1.0, "pairwise": 1.0, "ints": 1.0}
        self.bias = 0.0
        self._calibrate()

    def _build_tables(self, rng: np.random.Generator) -> None:
        # Flat tables over all fields: a value's row is offset[f] + rank; a last row of
        # zeros serves missing values (and ranks past the table).
        self.w_offset = np.r_[0, np.cumsum(self.vocab)[:-1]].astype(np.int32)
        self.w = np.r_[rng.standard_normal(int(self.vocab.sum())), 0.0].astype(np.float32)
        head = np.minimum(self.vocab, HEAD_RANKS)
        latent_end = self.world.latent_end()
        tail = (self.vocab if latent_end is None else np.minimum(self.vocab, latent_end)) - head
        self.head_offset = np.r_[0, np.cumsum(head)[:-1]].astype(np.int32)
        self.tail_offset = np.r_[0, np.cumsum(tail)[:-1]].astype(np.int32)
        self.head_len, self.tail_len = head, tail
        head_ranks = np.concatenate([np.arange(n) for n in head])
        tail_ranks = np.concatenate([np.arange(HEAD_RANKS, HEAD_RANKS + n) for n in tail])
        self.v_head = self._masked_normal(rng, head_ranks, self.world.widest(0, HEAD_RANKS))
        self.v_tail = self._masked_normal(rng, tail_ranks, self.world.widest(HEAD_RANKS))
        self.head_norm2 = (self.v_head**2).sum(1)
        self.tail_norm2 = (self.v_tail**2).sum(1)

    def _masked_normal(self, rng: np.random.Generator, ranks: np.ndarray, width: int) -> np.ndarray:
        v = rng.standard_normal((ranks.size, width)).astype(np.float32)
        v[np.arange(width)[None, :] >= self.world.latent_dims(ranks)[:, None]] = 0
        return np.r_[v, np.zeros((1, width), np.float32)]

    def _terms(
        self, ranks: np.ndarray, ints: np.ndarray, missing: np.ndarray, latent_ranks: Optional[int] = None,
    ) -> np.ndarray:
        """Unscaled (first-order, pairwise, ints) terms, ``[3, n]`` (``latent_ranks``: see ``logits``)."""
        present = (ranks >= 0) & (ranks < self.vocab)  # tail values carry no signal
        with_latent = present if latent_ranks is None else present & (ranks < latent_ranks)
        in_head = with_latent & (ranks < self.head_len)
        in_tail = with_latent & ~in_head & (ranks - HEAD_RANKS < self.tail_len)
        w_idx = np.where(present, self.w_offset + ranks, len(self.w) - 1)
        h_idx = np.where(in_head, self.head_offset + ranks, len(self.v_head) - 1)
        t_idx = np.where(in_tail, self.tail_offset + ranks - HEAD_RANKS, len(self.v_tail) - 1)
        # Sums of table rows over the fields of a row are embedding bags (20x numpy's gather).
        first = _bag_sum(self.w, w_idx)[:, 0]
        total = _bag_sum(self.v_head, h_idx)
        total[:, : self.v_tail.shape[1]] += _bag_sum(self.v_tail, t_idx)
        norms = _bag_sum(self.head_norm2, h_idx)[:, 0] + _bag_sum(self.tail_norm2, t_idx)[:, 0]
        # FM identity: sum_{f<g} <v_f, v_g> = (|sum_f v_f|^2 - sum_f |v_f|^2) / 2
        pairwise = 0.5 * (np.einsum("ij,ij->i", total, total) - norms)
        coef = np.array([c for *_, c in INTEGERS])
        used = np.flatnonzero(coef)
        logs = np.where(missing[:, used], 0.0, np.log1p(np.maximum(ints[:, used], 0)))
        return np.stack([first, pairwise, logs @ coef[used]]).astype(np.float64)

    def _calibrate(self) -> None:
        rng = np.random.default_rng([self.seed, 1 << 41])
        ranks, ints, missing = self._draw_features(rng, CALIBRATION_ROWS, 1 << 41)
        terms = self._terms(ranks, ints, missing)
        names = ("first_order", "pairwise", "ints")
        # A term that never varies (no integer field in the ratings world) gets no weight.
        self.scales = {k: TERM_STD[k] / float(t.std()) if t.std() > 0 else 0.0 for k, t in zip(names, terms)}
        logit = sum(self.scales[k] * t for k, t in zip(names, terms))
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection: mean CTR is increasing in the bias
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < TARGET_CTR else (lo, mid)
        self.bias = (lo + hi) / 2

    def _draw_features(self, rng: np.random.Generator, n: int, stream: int):
        """Ranks, integers and their missing mask of ``n`` rows; ``stream`` seeds the tail."""
        f = len(CATEGORICALS)
        u = rng.random((n, f), dtype=np.float32)
        one_minus_s = (1.0 - self.zipf_s).astype(np.float32)
        top = ((self.vocab + 1.0) ** one_minus_s - 1.0).astype(np.float32)
        # Inverse CDF of a continuous power law on [1, V+1), floored to a rank.
        ranks = ((1.0 + u * top) ** (1.0 / one_minus_s)).astype(np.int32) - 1
        ranks = np.minimum(ranks, self.vocab - 1)
        ranks[rng.random((n, f), dtype=np.float32) < self.cat_missing] = -1
        if self.tail is not None:
            self.tail.plant(ranks, self.vocab, np.random.default_rng([self.seed, stream, TAIL_STREAM]))
        params = np.array(INTEGERS, dtype=np.float32)
        z = rng.standard_normal((n, len(INTEGERS)), dtype=np.float32) * params[:, 2] + params[:, 1]
        ints = np.expm1(np.clip(z, 0.0, 18.0)).astype(np.int64)
        negative = rng.random((n, len(INTEGERS)), dtype=np.float32) < params[:, 3]
        ints[negative] = -rng.integers(1, 4, size=int(negative.sum()))
        missing = rng.random((n, len(INTEGERS)), dtype=np.float32) < self.int_missing.astype(np.float32)
        return ranks, ints, missing

    def logits(
        self, ranks: np.ndarray, ints: np.ndarray, ints_missing: np.ndarray, latent_ranks: Optional[int] = None,
    ) -> np.ndarray:
        """The true logit of features (as in ``Rows``), float64 ``[n]``.

        With ``latent_ranks``, values of rank >= ``latent_ranks`` contribute no latent
        vector (their first-order weight stays): the oracle of a prune that drops them.

        Example:
            >>> gen = SyntheticCriteo(seed=0, vocab_scale=0.01)
            >>> r = gen.rows(0, 3)
            >>> bool(np.allclose(gen.logits(r.ranks, r.ints, r.ints_missing), r.logits))
            True
        """
        terms = self._terms(ranks, ints, ints_missing, latent_ranks)
        return self.bias + sum(self.scales[k] * t for k, t in zip(self.scales, terms))

    def _block(self, block: int) -> Rows:
        rng = np.random.default_rng([self.seed, block])
        ranks, ints, missing = self._draw_features(rng, BLOCK_ROWS, block)
        logits = self.logits(ranks, ints, missing)
        labels = (rng.random(BLOCK_ROWS) < 1 / (1 + np.exp(-logits))).astype(np.uint8)
        return Rows(labels, ints, missing, ranks, logits)

    def rows(self, start: int, stop: int) -> Rows:
        """Rows ``[start, stop)`` of the infinite stream."""
        parts = []
        for block in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1 if stop > start else 0):
            lo = max(start - block * BLOCK_ROWS, 0)
            hi = min(stop - block * BLOCK_ROWS, BLOCK_ROWS)
            b = self._block(block)
            parts.append(Rows(*(getattr(b, k)[lo:hi] for k in Rows.__dataclass_fields__)))
        if not parts:
            return Rows(*(getattr(self._block(0), k)[:0] for k in Rows.__dataclass_fields__))
        return Rows(*(np.concatenate([getattr(p, k) for p in parts]) for k in Rows.__dataclass_fields__))

    def hex_ids(self, ranks: np.ndarray) -> np.ndarray:
        """32-bit id of ``(field, rank)`` for ``ranks`` of shape ``[n, 26]``: a bijection per field."""
        x = ranks.astype(np.uint32) ^ self.hex_keys[:, 0]
        # lowbias32 (Wellons): xorshift-multiply rounds (uint32 wraps), invertible.
        x ^= x >> 16
        x *= np.uint32(0x7FEB352D)
        x ^= x >> 15
        x *= np.uint32(0x846CA68B)
        x ^= x >> 16
        return x ^ self.hex_keys[:, 1]

    def to_tsv(self, rows: Rows) -> bytes:
        """Criteo TSV text of ``rows``.

        Rows are laid out in a byte matrix (fixed slots, NUL-padded) filled from lookup
        tables; dropping the NULs leaves the text, so formatting stays vectorised.
        """
        n, ni, nc = rows.labels.size, rows.ints.shape[1], rows.ranks.shape[1]
        int_end = 1 + ni * (1 + INT_WIDTH)
        buf = np.empty((n, int_end + nc * 9 + 1), np.uint8)  # every byte is set below
        buf[:, 0] = 48 + rows.labels
        ints = buf[:, 1:int_end].reshape(n, ni, 1 + INT_WIDTH)
        ints[:, :, 0] = 9
        ints[:, :, 1:] = _int_chars(rows.ints, rows.ints_missing)
        cats = buf[:, int_end:-1].reshape(n, nc, 9)
        cats[:, :, 0] = 9
        big_endian = self.hex_ids(np.maximum(rows.ranks, 0)).astype(">u4").view(np.uint8)
        hex_pairs = _HEX_PAIRS[big_endian.reshape(n, nc, 4)]
        hex_pairs[rows.ranks < 0] = 0
        cats[:, :, 1:] = hex_pairs.view(np.uint8)
        buf[:, -1] = 10
        flat = buf.reshape(-1)
        return flat[flat != 0].tobytes()

    def truth(self, rows: int, days: int) -> dict:
        """The planted model, for ``synth_truth.json``."""
        fields = {}
        for i, (v, m, s) in enumerate(zip(self.vocab, self.cat_missing, self.zipf_s)):
            lo, tiers = 0, []
            for hi, d in self.world.tiers + ((int(v), self.world.dims_past_tiers),):
                if lo < min(hi, v):
                    tiers.append([lo, int(min(hi, v)), d])
                lo = max(lo, hi)
            fields[f"C{i + 1}"] = {"vocab": int(v), "missing": float(m), "zipf_s": float(s), "tiers": tiers}
        ints = {f"I{i + 1}": {"missing": float(m), "mu": p[1], "sigma": p[2], "negative": p[3], "coef": p[4]}
                for i, (m, p) in enumerate(zip(self.int_missing, INTEGERS))}
        return {"seed": self.seed, "rows": rows, "days": days, "vocab_scale": self.vocab_scale,
                "world": self.world.name, "vocab_cap": self.world.vocab_cap,
                "zipf_factor": self.world.zipf_factor, "latent_dim": LATENT_DIM,
                "tiers": [list(t) for t in self.world.tiers],
                "dims_past_tiers": self.world.dims_past_tiers, "term_std": TERM_STD,
                "scales": self.scales, "bias": self.bias, "target_ctr": TARGET_CTR,
                "categoricals": fields, "integers": ints,
                "heavy_tail": None if self.tail is None else asdict(self.tail)}


def _bag_sum(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx].sum(1)`` for ``idx`` of shape ``[n, F]``, as float32 ``[n, width]``."""
    table = torch.from_numpy(table.reshape(len(table), -1))
    return F.embedding_bag(torch.from_numpy(idx), table, mode="sum").numpy()


def _char_table(texts: list[str]) -> np.ndarray:
    """Right-aligned, NUL-padded 4-byte cells of ``texts`` as one uint32 each."""
    cells = np.zeros((len(texts), 4), np.uint8)
    for i, t in enumerate(texts):
        cells[i, 4 - len(t) :] = np.frombuffer(t.encode(), np.uint8)
    return cells.view(np.uint32).reshape(-1)


_SMALL_MIN = -999
_SMALL = _char_table([str(v) for v in range(_SMALL_MIN, 10000)])  # '-999' .. '9999'
_PADDED = _char_table([f"{v:04d}" for v in range(10000)])  # '0000' .. '9999'
_HEX_PAIRS = _char_table([f"{b:02x}" for b in range(256)]).view(np.uint16)[1::2].copy()


def _int_chars(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """``[n, k, 8]`` right-aligned decimal chars of ``values``, NUL elsewhere."""
    if values.size and (values.min() < _SMALL_MIN or values.max() >= 10**INT_WIDTH):
        raise ValueError(f"integers must lie in [{_SMALL_MIN}, 1e{INT_WIDTH})")
    small = values < 10000
    hi = np.where(small, 0, _SMALL[np.clip(values // 10000 - _SMALL_MIN, 0, None)])
    lo = np.where(small, _SMALL[np.clip(values, _SMALL_MIN, 9999) - _SMALL_MIN],
                  _PADDED[values % 10000])
    cells = np.stack([hi, lo], -1)
    cells[missing] = 0
    return cells.view(np.uint8)


def write(
    out: str | Path, rows: int, seed: int = 0, days: int = 0, compress: bool = False,
    vocab_scale: float = 1.0, truth: Optional[str | Path] = None, world: str = "longtail",
    tail: Optional[HeavyTail] = None,
) -> list[Path]:
    """Write ``rows`` rows to ``out`` (or ``out/day_0..day_{days-1}``) and the truth file.

    Returns the written data files. Memory stays at one block whatever ``rows`` is.
    """
    if rows <= 0 or days < 0:
        raise ValueError(f"need rows > 0 and days >= 0, got rows={rows}, days={days}")
    gen = SyntheticCriteo(seed, vocab_scale, world, tail)
    out = Path(out)
    suffix = ".gz" if compress else ""
    if days:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"day_{d}{suffix}" for d in range(days)]
        bounds = [rows * d // days for d in range(days + 1)]
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out.with_name(out.name + suffix) if compress and out.suffix != ".gz" else out]
        bounds = [0, rows]
    for path, lo, hi in zip(paths, bounds[:-1], bounds[1:]):
        tmp = path.with_name(path.name + ".tmp")
        with (gzip.open(tmp, "wb", compresslevel=1) if compress else open(tmp, "wb")) as f:
            start = lo
            while start < hi:
                stop = min(hi, (start // BLOCK_ROWS + 1) * BLOCK_ROWS)
                f.write(gen.to_tsv(gen.rows(start, stop)))
                start = stop
        tmp.replace(path)
    truth_path = Path(truth) if truth else (out if days else out.parent) / "synth_truth.json"
    truth_path.write_text(json.dumps(gen.truth(rows, days), indent=1))
    return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dnis-synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, required=True, help="rows in total")
    p.add_argument("--out", required=True, help="output file, or directory with --days")
    p.add_argument("--days", type=int, default=0, help="write day_0..day_{D-1} (Criteo 1TB layout)")
    p.add_argument("--gzip", action="store_true", help="gzip the output (.gz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-scale", type=float, default=1.0, help="multiply every vocabulary size")
    p.add_argument("--truth", default=None, help="where to write synth_truth.json")
    p.add_argument("--world", choices=sorted(WORLDS), default="longtail",
                   help="longtail: rare values need few or no dims; flat: every value needs 4; "
                        "ratings: users and items only, 8 dims each (see pipeline/data/synth_worlds.py)")
    p.add_argument("--tail-field", default=None, metavar="C<n>",
                   help="plant a heavy tail of extra values without signal in this field")
    p.add_argument("--tail-rate", type=float, default=0.5, help="share of rows drawing a tail value")
    p.add_argument("--tail-values", type=int, default=1 << 30, help="how many tail values there are")
    p.add_argument("--tail-zipf", type=float, default=0.5,
                   help="power-law exponent of the tail values in [0, 1) (0: uniform)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        tail = (HeavyTail(args.tail_field, args.tail_rate, args.tail_values, args.tail_zipf)
                if args.tail_field else None)
        paths = write(args.out, args.rows, args.seed, args.days, args.gzip, args.vocab_scale, args.truth,
                      args.world, tail)
    except ValueError as err:
        raise SystemExit(f"dnis-synth: error: {err}") from None
    elapsed = time.perf_counter() - t0
    print(f"wrote {args.rows} rows to {len(paths)} file(s) in {elapsed:.1f}s "
          f"({args.rows / elapsed:,.0f} rows/s)")


if __name__ == "__main__":
    main()
