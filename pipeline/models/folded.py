"""A model's interaction folded onto a repacked embedding's pooled columns, for serving.

A repacked model's fields are a linear map of its pooled slab columns: ``flat(fields) =
x @ lift``, where ``x`` is ``[dense field, pooled columns]`` (``C`` pooled columns, far
fewer than the ``F * K`` of the fields; see ``RepackedEmbedding.output_map``) and ``lift``
places each column (selection) or projects it (NIS-ME). Every linear layer that reads
``flat`` then reads ``x`` through ``W @ liftᵀ``, and the FM term needs only
``Σ_i v_i = x @ (lift S)`` and ``Σ_i |v_i|² = rowsum(x ⊙ (x @ lift liftᵀ))``. So a served
FM, DeepFM or Wide & Deep never builds the mostly-zero ``[B, F, K]`` fields, and its
first layer is ``C`` wide instead of ``F * K``: at CR 10 the 1,248 → 400 layer of the
benchmark's DeepFM becomes 260 → 400. Outputs equal the unfolded model's up to float
rounding (sums over fewer terms). A model is folded only where that costs fewer
operations per row (``folded_interaction``). A selection only places columns, so its FM
sums are one add per pooled column (``index_add``) and it always folds, even for a plan
that keeps all ``K`` columns of some group of every feature (the value allocation's
frequent ids): the first layer is as wide as unfolded, but the ``[B, F, K]`` scatter
(8.8 ms of a 33 ms forward at 4096 rows) is gone. A learned projection pays ``C²`` for
its Gram term, block by block (``gram_blocks``: a feature's columns only meet its own,
``Σ_f W_f²`` rather than ``C²``), and folds when that is cheaper than the fields. Models
whose fields meet a non-linearity first (DCNv2's cross, DLRM's dots) are not folded.

Example:
    >>> lift = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # 2 columns -> F=2, K=2
    >>> fold_linear(nn.Linear(4, 1), lift).weight.shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn


def fold_linear(linear: nn.Linear, lift: torch.Tensor) -> nn.Linear:
    """``linear`` applied to ``x @ lift``, as a linear layer of ``x``."""
    folded = nn.Linear(lift.shape[0], linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        folded.weight.copy_(linear.weight @ lift.T)
        if linear.bias is not None:
            folded.bias.copy_(linear.bias)
    return folded


def fold_head(head: nn.Module, lift: torch.Tensor) -> nn.Module:
    """A copy of ``head`` (an MLP, or one linear layer) whose first linear layer reads ``x``."""
    if isinstance(head, nn.Linear):
        return fold_linear(head, lift)
    folded = copy.deepcopy(head)
    name = next(n for n, m in folded.named_modules() if m is first_linear(folded))
    parent, _, attr = name.rpartition(".")
    setattr(folded.get_submodule(parent), attr, fold_linear(first_linear(folded), lift))
    return folded


def first_linear(head: nn.Module) -> nn.Linear:
    """The first linear layer ``head`` applies (itself, for a linear layer)."""
    return head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))


def field_places(lift: torch.Tensor, embedding_dim: int) -> Optional[torch.Tensor]:
    """Each row's column within its field (``[X]``) where ``lift`` only places columns
    (every row one-hot, its entry 1: a selection), else ``None``.

    Example:
        >>> field_places(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]), 2)
        tensor([0, 1])
    """
    placed = lift != 0
    if not (placed.sum(dim=1) == 1).all() or not (lift[placed] == 1).all():
        return None
    return placed.int().argmax(dim=1) % embedding_dim


def gram_blocks(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of a symmetric ``[X, X]`` matrix: rows that never meet another block's
    (connected components of its non-zeros), as an index ``[blocks, W]`` of each block's
    rows (padded with ``X``: a zero column appended to ``x``) and their sub-matrices
    ``[blocks, W, W]`` (zero-padded), so ``x gram xᵀ`` is a sum over blocks.

    Example:
        >>> index, blocks = gram_blocks(torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 2.0]]))
        >>> index.tolist(), blocks[1].tolist()
        ([[0, 2], [1, 3]], [[3.0, 0.0], [0.0, 0.0]])
    """
    size = gram.shape[0]
    linked, label = gram != 0, torch.arange(size)
    while True:  # each row takes the least label among the rows it meets, until none changes
        spread = torch.minimum(torch.where(linked, label[None, :], size).min(dim=1).values, label)
        if torch.equal(spread, label):
            break
        label = spread
    members = [torch.nonzero(label == first).view(-1) for first in torch.unique(label)]
    width = max(len(m) for m in members)
    index = torch.full((len(members), width), size, dtype=torch.int64)
    blocks = gram.new_zeros(len(members), width, width)
    for b, rows in enumerate(members):
        index[b, : len(rows)] = rows
        blocks[b, : len(rows), : len(rows)] = gram[rows][:, rows]
    return index, blocks


def folded_interaction(
    dense_arch: Optional[nn.Module], heads: Sequence[nn.Module], lift: torch.Tensor, embedding_dim: int, fm: bool,
) -> Optional[FoldedInteraction]:
    """``FoldedInteraction`` of a model's ``heads`` (unfolded: its linear layers and MLPs
    that read ``flat(fields)``), or ``None`` where folding would cost more multiply-adds
    per row than the model's own interaction: a plan that keeps every column of some
    group of each feature pools as many columns as the fields have, and a learned
    projection's Gram term costs ``W²`` per block of ``W`` columns that meet.
    """
    columns, flat = lift.shape
    outputs = sum(first_linear(h).out_features for h in heads)
    gram = lift @ lift.T
    # Selection puts each column in a place of its own: the Gram matrix is the identity.
    blocks = None if torch.equal(gram, torch.eye(columns)) else gram_blocks(gram)
    sums = columns if field_places(lift, embedding_dim) is not None else columns * embedding_dim
    squares = columns if blocks is None else blocks[1].numel()
    folded = columns * outputs + (sums + squares if fm else 0)
    unfolded = flat * outputs + (3 * flat if fm else 0) + flat  # the last: building the fields
    if folded >= unfolded:
        return None
    return FoldedInteraction(dense_arch, [fold_head(h, lift) for h in heads], lift, blocks, embedding_dim, fm)


class FoldedInteraction(nn.Module):
    """Logits ``[B]`` from dense values and pooled columns ``[B, C]``: the sum of
    ``heads`` (each ``[B, 1]``) plus, with ``fm``, the FM pairwise term.

    Args:
        dense_arch: the model's bottom MLP (its output is the first field), or ``None``.
        heads: the model's linear and MLP heads, folded (``fold_linear``, ``fold_head``).
        lift: ``[X, F' * K]``, ``x -> flat(fields)``.
        blocks: ``gram_blocks(lift @ liftᵀ)``, or ``None`` where it is the identity.
        embedding_dim: ``K``.
        fm: whether the model adds ``Σ_{i<j} <v_i, v_j>``.
    """

    def __init__(
        self, dense_arch: Optional[nn.Module], heads: Sequence[nn.Module], lift: torch.Tensor,
        blocks: Optional[tuple[torch.Tensor, torch.Tensor]], embedding_dim: int, fm: bool,
    ) -> None:
        super().__init__()
        self.dense_arch, self.heads, self.fm = dense_arch, nn.ModuleList(heads), fm
        fields = lift.shape[1] // embedding_dim
        self.embedding_dim = embedding_dim
        # Σ_i v_i: a selection's columns added at their places, else a product with lift S.
        places = field_places(lift, embedding_dim)
        sums = None if places is not None else lift @ torch.eye(embedding_dim).repeat(fields, 1)
        self.places: Optional[torch.Tensor]
        self.field_sums: Optional[torch.Tensor]
        self.register_buffer("places", places, persistent=False)
        self.register_buffer("field_sums", sums, persistent=False)
        self.block_index: Optional[torch.Tensor]
        self.gram: Optional[torch.Tensor]
        self.register_buffer("block_index", None if blocks is None else blocks[0].view(-1), persistent=False)
        self.register_buffer("gram", None if blocks is None else blocks[1], persistent=False)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled if self.dense_arch is None else torch.cat([self.dense_arch(dense), pooled], dim=1)
        out = sum(head(x) for head in self.heads).squeeze(1)
        if not self.fm:
            return out
        if self.field_sums is not None:
            field_sum = x @ self.field_sums
        else:  # one add per column, not a [C, K] product (4.5 -> 2.4 ms at 4096 × 1,248)
            field_sum = x.new_zeros(x.shape[0], self.embedding_dim).index_add_(1, self.places, x)
        square_of_sum = field_sum.square().sum(dim=1)
        if self.gram is None:  # the norm reads x once, x * x writes a copy first (0.4 vs 1.2 ms)
            sum_of_squares = torch.linalg.vector_norm(x, dim=1).square()
        else:  # per block of columns that meet: [B, blocks, W] against [blocks, W, W]
            gram = self.gram
            blocked = nn.functional.pad(x, (0, 1)).index_select(1, self.block_index).view(x.shape[0], *gram.shape[:2])
            sum_of_squares = (blocked * torch.einsum("bgw,gwv->bgv", blocked, gram)).sum(dim=(1, 2))
        return out + 0.5 * (square_of_sum - sum_of_squares)
