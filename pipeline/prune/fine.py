"""Fine-grained pruning of a searched α-model (DNIS eq. 9) for a COO byte budget.

``Ẽ = E ⊙ α[block(id)]``; entries with ``|Ẽ| < ε`` are zeroed and the rest are stored
in COO (``bytes.fine_grained_bytes``). Ẽ is never formed whole: every rank scales the
rows of the table shards it holds (``sharding.table_stats``), chunk by chunk, by the α
row of their block. ``apply_epsilon`` zeroes the pruned entries in E itself, so the
α-model then computes the eq. 9 model unchanged.

ε for a target compression ratio is a distributed radix select on the float32 bits of
``|Ẽ|`` (non-negative floats order like their bit patterns): three passes, each an
all-reduced histogram of the next 12, 12 and 7 bits, give the exact smallest ε whose
kept entries fit the budget. Entries tied at a value are kept or dropped together, so
ties never push the bytes over the budget. Exact zeros of Ẽ are never stored.

    python -m launch.prune --run-dir runs/synthetic/search --mode fine --cr 10

Example (40 entries, 160 bytes; CR 2 leaves 80 bytes, room for 8 COO entries, but
the 8th and 9th largest |Ẽ| tie at 17, so 7 are kept):
    >>> from torchrec.modules.embedding_modules import EmbeddingBagCollection
    >>> from pipeline.search.blocking import compute_blocking
    >>> from sharding.alpha_ebc import AlphaEmbeddingBagCollection
    >>> from sharding.field_embedding import table_configs
    >>> blocking = compute_blocking({"a": [[3, 10]]}, num_blocks=2)  # ids 0-4, 5-9
    >>> m = AlphaEmbeddingBagCollection(EmbeddingBagCollection(table_configs({"a": 10}, 4, 0.1)), blocking)
    >>> m.ebc.embedding_bags["t_a"].weight.data = torch.arange(1.0, 41.0).view(10, 4)
    >>> m.alpha.data = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    >>> found = epsilon_for_cr(m, blocking, m.alpha, target_cr=2.0)
    >>> 17.0 < found.epsilon < 17.001, found.nnz, round(found.compression_ratio, 3)
    (True, 7, 2.54)
    >>> apply_epsilon(m, blocking, m.alpha, found.epsilon)
    7
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from pipeline.prune.plan import group_ranges
from plans.blocking import Blocking
from plans.bytes import COO_ENTRY_BYTES, VALUE_BYTES, fine_grained_bytes, nnz_for_cr, unpruned_bytes
from sharding.shard_pieces import local_pieces
from sharding.table_stats import all_reduce_sum, feature_tables, group_rows, is_rank0

CHUNK_ROWS = 1 << 15
# (shift, bits) of the digits of a non-negative float32's 31 bits, most significant first.
RADIX_DIGITS = ((19, 12), (7, 12), (0, 7))


@dataclass(frozen=True)
class FinePrune:
    """A threshold ε, the non-zero entries of Ẽ it keeps and what they cost in COO."""

    epsilon: float
    nnz: int
    unpruned_bytes: int

    @property
    def coo_bytes(self) -> int:
        return fine_grained_bytes(self.nnz)

    @property
    def compression_ratio(self) -> float:
        """Unpruned ÷ COO bytes (infinite when nothing is kept)."""
        return self.unpruned_bytes / self.coo_bytes if self.nnz else float("inf")

    def to_json(self) -> dict:
        return {
            "epsilon": self.epsilon, "nnz": self.nnz, "coo_bytes": self.coo_bytes,
            "unpruned_bytes": self.unpruned_bytes, "compression_ratio": self.compression_ratio,
        }


def table_bytes(model: nn.Module, blocking: Blocking) -> int:
    """Unpruned fp32 bytes of the tables of ``blocking.keys`` (global sizes, no gathering)."""
    tables = feature_tables(model, blocking.keys).values()
    return sum(unpruned_bytes(t.size(0), t.size(1)) for t in tables)


def _scaled_rows(
    model: nn.Module, blocking: Blocking, alpha: torch.Tensor, counted_once: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows of E, their α row)`` over this rank's pieces, at most ``CHUNK_ROWS`` rows
    of one block each; ``rows * α`` is their Ẽ. The rows alias the tables. Replicated
    tables are included when ``counted_once``."""
    tables = feature_tables(model, blocking.keys)
    blocks = group_ranges(blocking, {key: t.size(0) for key, t in tables.items()})
    for block in blocks:
        for row, col, values in local_pieces(tables[block.key], counted_once):
            scale = alpha[block.block, col : col + values.shape[1]].to(values.device)
            lo, hi = group_rows(block, row, values.shape[0])
            for start in range(lo, hi, CHUNK_ROWS):
                yield values[start : min(start + CHUNK_ROWS, hi)], scale


@torch.no_grad()
def count_kept(model: nn.Module, blocking: Blocking, alpha: torch.Tensor, epsilon: float) -> int:
    """Non-zero entries of Ẽ with ``|Ẽ| ≥ epsilon``, over all ranks."""
    count = 0
    for rows, scale in _scaled_rows(model, blocking, alpha, counted_once=is_rank0()):
        scaled = (rows * scale).abs()
        count += int(((scaled >= epsilon) & (scaled > 0)).sum())
    return int(all_reduce_sum(torch.tensor(count)))


@torch.no_grad()
def _digit_histogram(
    model: nn.Module, blocking: Blocking, alpha: torch.Tensor, prefix: int, shift: int, bits: int
) -> torch.Tensor:
    """Counts of digit ``(b >> shift) mod 2^bits`` of the bits ``b`` of every non-zero
    ``|Ẽ|`` whose higher bits ``b >> (shift + bits)`` equal ``prefix``, over all ranks."""
    hist = torch.zeros(2**bits, dtype=torch.int64)
    for rows, scale in _scaled_rows(model, blocking, alpha, counted_once=is_rank0()):
        b = (rows * scale).abs().float().view(torch.int32)
        b = b[(b > 0) & ((b >> (shift + bits)) == prefix)]
        hist += torch.bincount((b >> shift) & (2**bits - 1), minlength=2**bits).cpu()
    return all_reduce_sum(hist)


def epsilon_for_budget(
    model: nn.Module, blocking: Blocking, alpha: torch.Tensor, max_nnz: int
) -> tuple[float, int]:
    """The smallest float32 ε keeping at most ``max_nnz`` non-zero entries of Ẽ, and
    how many it keeps (the same on every rank).

    Each pass fixes one digit of ε's bits. The digits fixed so far (``prefix``) define
    a window of bit patterns, with ``above`` entries beyond it; ``kept[d]`` counts the
    entries at or above the window's ``d``-th step. The first step that fits bounds ε
    from above and the step before it does not fit, so ε lies in digit ``d - 1``,
    the next pass's window.
    """
    prefix, above = 0, 0
    for shift, bits in RADIX_DIGITS:
        hist = _digit_histogram(model, blocking, alpha, prefix, shift, bits)
        kept = above + torch.cat([hist.flip(0).cumsum(0).flip(0), hist.new_zeros(1)])
        digit = int((kept > max_nnz).sum())  # kept never increases with d
        if digit == 0:  # only in the first pass: every non-zero entry fits
            return 0.0, int(kept[0])
        above = int(kept[digit])
        prefix = (prefix << bits) + digit - 1
    epsilon = torch.tensor(prefix + 1, dtype=torch.int32).view(torch.float32)
    return float(epsilon), above


def epsilon_for_cr(model: nn.Module, blocking: Blocking, alpha: torch.Tensor, target_cr: float) -> FinePrune:
    """ε keeping the most entries of Ẽ whose COO bytes fit ``unpruned / target_cr``.

    Raises:
        ValueError: ``target_cr`` ≤ 0, below what COO of every entry gives (4/9), or so
            high that no entry fits.
    """
    total = table_bytes(model, blocking)
    max_nnz = nnz_for_cr(total, target_cr)
    every_entry = fine_grained_bytes(total // VALUE_BYTES)
    if target_cr * every_entry < total:
        raise ValueError(
            f"compression ratio {target_cr:g} is unreachable: COO of every entry "
            f"({every_entry:,} bytes) already gives CR {total / every_entry:.4g}, the lowest"
        )
    if max_nnz < 1:
        raise ValueError(
            f"compression ratio {target_cr:g} is unreachable: its budget of "
            f"{int(total // target_cr):,} bytes holds no COO entry ({COO_ENTRY_BYTES} bytes)"
        )
    epsilon, nnz = epsilon_for_budget(model, blocking, alpha, max_nnz)
    return FinePrune(epsilon, nnz, total)


@torch.no_grad()
def apply_epsilon(model: nn.Module, blocking: Blocking, alpha: torch.Tensor, epsilon: float) -> int:
    """Zero the entries of E whose ``|E · α| < epsilon`` in every local piece (replicated
    tables on every rank); returns the non-zero entries of Ẽ left, over all ranks."""
    for rows, scale in _scaled_rows(model, blocking, alpha, counted_once=True):
        rows.masked_fill_((rows * scale).abs() < epsilon, 0.0)
    return count_kept(model, blocking, alpha, epsilon)
