"""NIS-ME's search space: the embedding-block grid (Joglekar et al., KDD'20, section 3).

The grid crosses the DNIS frequency blocks (α rows, ``blocking.py``) with ``S`` dimension
blocks of ``K/S`` columns. An *architecture* gives every α row ``l`` a number of dim
blocks ``d_l`` in ``0..S``: its ids keep their first ``d_l·K/S`` columns (Multi-size
Embedding), and the shipped model projects each (feature, block) group back to ``K``
with a learned matrix, whose bytes count (``plans/bytes.py``).

Example:
    >>> from pipeline.search.blocking import compute_blocking
    >>> b = compute_blocking({"a": [[5, 10], [1, 90]]}, num_blocks=2, mode="equal_mass")
    >>> grid = BlockGrid.build(b, {"a": 100}, embedding_dim=8, dim_blocks=2)
    >>> grid.mask(torch.tensor([2, 1])).tolist()
    [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    >>> grid.bytes([2, 0])  # block 0 (30 ids) × 8 fp32 columns, an 8×8 projection, 2 range starts
    1232
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.prune.plan import group_ranges
from plans.blocking import Blocking
from plans.bytes import group_bytes, unpruned_bytes
from plans.structured import WIDTH_MULTIPLE, Group, GroupPlan, StructuredPlan

PROJECTION = "learned"  # NIS-ME projects every width back to K with a learned matrix


@dataclass(frozen=True)
class BlockGrid:
    """(feature, frequency block) groups × ``dim_blocks`` column blocks of ``block_width``.

    Attributes:
        groups: one group per feature and non-empty frequency block (``group_ranges``).
        num_rows: α rows (``L``, or ``F·L`` with per-field blocking): one choice each.
        embedding_dim: ``K``.
        dim_blocks: ``S``.
    """

    groups: tuple[Group, ...]
    num_rows: int
    embedding_dim: int
    dim_blocks: int

    @classmethod
    def build(
        cls, blocking: Blocking, num_embeddings: dict[str, int], embedding_dim: int, dim_blocks: int
    ) -> "BlockGrid":
        """The grid of ``blocking``; ``K/S`` must be a positive multiple of 4 (TBE rows)."""
        if dim_blocks < 1 or embedding_dim % dim_blocks or (embedding_dim // dim_blocks) % WIDTH_MULTIPLE:
            raise ValueError(
                f"nis.dim_blocks={dim_blocks}: K={embedding_dim} must split into blocks whose "
                f"width is a multiple of {WIDTH_MULTIPLE}"
            )
        groups = tuple(group_ranges(blocking, num_embeddings, ranges_per_block=1))
        return cls(groups, blocking.num_alpha_rows, embedding_dim, dim_blocks)

    @property
    def block_width(self) -> int:
        return self.embedding_dim // self.dim_blocks

    def mask(self, arch) -> torch.Tensor:
        """``[rows, K]`` 0/1 α of ``arch``: row ``l`` keeps its first ``d_l·K/S`` columns."""
        keep = torch.as_tensor(arch, dtype=torch.int64).view(-1, 1) * self.block_width
        return (torch.arange(self.embedding_dim).view(1, -1) < keep).float()

    def widths(self, arch) -> np.ndarray:
        """Stored width of every group under ``arch``."""
        arch = np.asarray(arch, dtype=np.int64)
        return np.array([arch[g.block] * self.block_width for g in self.groups], dtype=np.int64)

    def bytes(self, arch) -> int:
        """Serving bytes of ``arch`` with learned projections (values, range starts, projections)."""
        rows = np.array([g.rows for g in self.groups], dtype=np.int64)
        return int(group_bytes(rows, self.widths(arch), self.embedding_dim, PROJECTION).sum())

    def unpruned_bytes(self) -> int:
        return unpruned_bytes(sum(g.rows for g in self.groups), self.embedding_dim)

    def budget(self, target_cr: float) -> float:
        """Bytes a plan may use to reach ``target_cr``."""
        if target_cr <= 0:
            raise ValueError(f"target CR must be > 0, got {target_cr}")
        return self.unpruned_bytes() / target_cr

    def bytes_per_dim_block(self) -> np.ndarray:
        """``[rows]``: bytes one more dim block costs in each α row (bytes are linear in ``d_l``)."""
        one = np.zeros(self.num_rows, dtype=np.int64)
        cost = np.zeros(self.num_rows, dtype=np.int64)
        for row in range(self.num_rows):
            one[:] = 0
            one[row] = 1
            cost[row] = self.bytes(one) - self.bytes(np.zeros_like(one))
        return cost

    def plan(self, arch) -> StructuredPlan:
        """``arch`` as a structured prune plan: each group keeps columns ``0..w-1``
        (``tau`` is 0: no threshold chose them)."""
        plans = tuple(
            GroupPlan(g, tuple(range(int(w)))) for g, w in zip(self.groups, self.widths(arch))
        )
        return StructuredPlan(plans, self.embedding_dim, tau=0.0)


def most_probable_within_budget(grid: BlockGrid, log_probs: torch.Tensor, budget: float) -> np.ndarray:
    """Per α row the most probable ``d_l``; while over ``budget``, shrink by one dim block
    the row that loses the least log-probability per byte saved.

    Args:
        grid: the search space.
        log_probs: ``[rows, S+1]`` controller log-probabilities.
        budget: bytes the architecture may use.

    Raises:
        ValueError: when even ``d = 0`` everywhere (range starts only) is over the budget.

    Example:
        >>> from pipeline.search.blocking import compute_blocking
        >>> b = compute_blocking({"a": [[5, 10], [1, 90]]}, num_blocks=2, mode="equal_mass")
        >>> grid = BlockGrid.build(b, {"a": 100}, embedding_dim=8, dim_blocks=2)
        >>> lp = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.1, 0.1, 0.8]]))
        >>> most_probable_within_budget(grid, lp, budget=2000).tolist()  # row 1 (70 ids) shrinks
        [2, 0]
    """
    log_probs = log_probs.detach().double().cpu().numpy()
    arch = log_probs.argmax(axis=1)
    cost = grid.bytes_per_dim_block()
    while grid.bytes(arch) > budget:
        shrinkable = np.flatnonzero((arch > 0) & (cost > 0))
        if shrinkable.size == 0:
            floor = grid.bytes(np.zeros_like(arch))
            raise ValueError(
                f"no architecture fits {budget:,.0f} bytes: dropping every group still takes "
                f"{floor:,} bytes (CR {grid.unpruned_bytes() / floor:.4g} at most)"
            )
        rows = np.arange(len(arch))[shrinkable]
        lost = log_probs[rows, arch[rows]] - log_probs[rows, arch[rows] - 1]
        arch[rows[np.argmin(lost / cost[rows])]] -= 1
    return arch
