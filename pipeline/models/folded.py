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
its Gram term and folds only when ``C`` is small, unless its rows are orthonormal (as
serving makes them). Models whose fields meet a
non-linearity first (DCNv2's cross, DLRM's dots) are not folded. The heads' folded first
layers (and a learned projection's FM sums) are stacked into one linear layer: one
product per request instead of one per head, which is most of a request at batch 1.

Example:
    >>> lift = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # 2 columns -> F=2, K=2
    >>> deep = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> folded = folded_interaction(None, [nn.Linear(4, 1), deep], lift, 2, fm=False)
    >>> folded.first_t.shape               # both heads' first layers, on the 2 columns
    torch.Size([2, 4])
"""

from __future__ import annotations

import copy
from itertools import accumulate
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.functional import linear


def rest_of(head: nn.Module) -> nn.ModuleList:
    """Copies of the linear layers ``head`` (a linear layer, or ``mlp_head``'s
    ``Sequential``: linear layers with a ReLU between each two) applies after its first
    layer; each reads the ReLU of the one before.

    Raises:
        ValueError: for a head of another shape.
    """
    if isinstance(head, nn.Linear):
        return nn.ModuleList()
    layers = list(head)
    if not (all(isinstance(m, nn.ReLU) for m in layers[1::2]) and all(isinstance(m, nn.Linear) for m in layers[::2])):
        raise ValueError(f"cannot fold a head that is not linear layers with ReLUs between them: {head}")
    return nn.ModuleList(copy.deepcopy(layers[2::2]))


def bias_of(layer: nn.Linear) -> torch.Tensor:
    """``layer``'s bias, zeros where it has none."""
    return layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features)


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


def folded_interaction(
    dense_arch: Optional[nn.Module], heads: Sequence[nn.Module], lift: torch.Tensor, embedding_dim: int, fm: bool,
) -> Optional[FoldedInteraction]:
    """``FoldedInteraction`` of a model's ``heads`` (unfolded: its linear layers and MLPs
    that read ``flat(fields)``), or ``None`` where folding would cost more multiply-adds
    per row than the model's own interaction: a plan that keeps every column of some
    group of each feature pools as many columns as the fields have, and a learned
    projection's Gram term costs ``C²``.
    """
    columns, flat = lift.shape
    outputs = sum(first_linear(h).out_features for h in heads)
    gram = lift @ lift.T
    # Selection puts each column in a place of its own, and serving re-bases a learned
    # projection to orthonormal rows (``sharding.serving_rows.orthonormal_projections``):
    # the Gram matrix is the identity, up to float rounding for the latter.
    gram = None if torch.allclose(gram, torch.eye(columns), rtol=0, atol=1e-5) else gram
    placed = field_places(lift, embedding_dim) is not None
    sums = columns if placed else columns * embedding_dim
    squares = columns if gram is None else columns * columns
    folded = columns * outputs + (sums + squares if fm else 0)
    # The unfolded model builds its fields first: a selection places the columns, a
    # learned projection multiplies them (as the folded FM sums do).
    unfolded = flat * outputs + (3 * flat if fm else 0) + (flat if placed else columns * embedding_dim)
    if folded >= unfolded:
        return None
    return FoldedInteraction(dense_arch, heads, lift, gram, embedding_dim, fm)


class FoldedInteraction(nn.Module):
    """Logits ``[B]`` from dense values and pooled columns ``[B, C]``: the sum of the
    heads (each ``[B, 1]``) plus, with ``fm``, the FM pairwise term.

    The heads' folded first layers are one product, ``first = x @ first_t + first_bias``,
    whose outputs are laid out so that each later step reads a contiguous range without
    a split: the MLP heads' hidden units first (each head a ``narrow``), then a tail of
    the FM field sums (a learned projection's, ``K`` columns) and the linear heads' logits
    (one column each), which two matrix-vector products add up: ``tail @ direct`` for the
    linear heads and ``tail² @ half_sums`` for ``½|Σ_i v_i|²``. At batch 1 a call is a
    chain of small ops: with a split, slices and weights read through their modules the
    interaction took 1.02–1.07× the unpruned model's (flat world, interleaved with it),
    laid out so 0.81–0.88×; at 4096 rows nothing changed (A/B in the README).

    Args:
        dense_arch: the model's bottom MLP (its output is the first field), or ``None``.
        heads: the model's linear and MLP heads that read ``flat(fields)`` (copied; their
            first layers are folded and stacked into ``first_t``).
        lift: ``[X, F' * K]``, ``x -> flat(fields)``.
        gram: ``lift @ liftᵀ``, or ``None`` where it is the identity.
        embedding_dim: ``K``.
        fm: whether the model adds ``Σ_{i<j} <v_i, v_j>``.

    Raises:
        ValueError: for a linear head with more than one output (heads add up to one logit).
    """

    def __init__(
        self, dense_arch: Optional[nn.Module], heads: Sequence[nn.Module], lift: torch.Tensor,
        gram: Optional[torch.Tensor], embedding_dim: int, fm: bool,
    ) -> None:
        super().__init__()
        self.dense_arch, self.fm = dense_arch, fm
        fields = lift.shape[1] // embedding_dim
        self.embedding_dim = embedding_dim
        places = field_places(lift, embedding_dim)
        rests = [rest_of(h) for h in heads]
        mlps = [(first_linear(h), rest) for h, rest in zip(heads, rests) if len(rest)]
        linears = [first_linear(h) for h, rest in zip(heads, rests) if not len(rest)]
        if any(f.out_features != 1 for f in linears):
            raise ValueError("a linear head folds only with one output (its logit)")
        # The product's outputs, in order: the MLP heads' hidden units, the FM sums Σ_i v_i
        # (a learned projection's: a product with lift S; a selection adds its columns at
        # their places instead), the linear heads' logits.
        sums = (lift @ torch.eye(embedding_dim).repeat(fields, 1)).T if fm and places is None else None
        blocks = [(f.weight.detach() @ lift.T, bias_of(f)) for f, _ in mlps]
        blocks += [(sums, torch.zeros(embedding_dim))] if sums is not None else []
        blocks += [(f.weight.detach() @ lift.T, bias_of(f)) for f in linears]
        self.first_t: torch.Tensor
        self.register_buffer("first_t", torch.cat([w for w, _ in blocks]).T, persistent=False)  # [X, outputs]
        self.first_bias: torch.Tensor
        self.register_buffer("first_bias", torch.cat([b for _, b in blocks]), persistent=False)
        widths = [f.out_features for f, _ in mlps]
        self.mlp_parts = list(zip(accumulate(widths, initial=0), widths))  # (start, width) of each
        self.rests = nn.ModuleList([rest for _, rest in mlps])
        self.tail_start = sum(widths)
        width = (0 if sums is None else embedding_dim) + len(linears)
        self.direct: torch.Tensor  # [tail]: 1 at the linear heads' logits
        self.register_buffer("direct", torch.zeros(width), persistent=False)
        self.direct[width - len(linears):] = 1
        self.half_sums: torch.Tensor  # [tail]: ½ at the field sums
        self.register_buffer("half_sums", torch.zeros(width), persistent=False)
        self.half_sums[: width - len(linears)] = 0.5
        self.places: Optional[torch.Tensor]
        self.register_buffer("places", places, persistent=False)
        self.gram: Optional[torch.Tensor]
        self.register_buffer("gram", gram, persistent=False)
        # Folded dense keys (``take_dense_rows``): [D, outputs], [D, K] (a selection's FM sums), [D].
        self.dense_map: Optional[torch.Tensor]
        self.register_buffer("dense_map", None, persistent=False)
        self.dense_sums: Optional[torch.Tensor]
        self.register_buffer("dense_sums", None, persistent=False)
        self.dense_norms: Optional[torch.Tensor]
        self.register_buffer("dense_norms", None, persistent=False)
        self.dense_row_bytes = 0

    def take_dense_rows(self, rows: torch.Tensor) -> None:
        """Read the first ``C_d`` pooled columns as ``dense @ rows`` (``rows``: ``[D, C_d]``)
        instead of from ``pooled``, which then starts after them: the columns of the
        one-row tables of weighted dense keys (such a lookup pools the dense value times
        the row; each key's columns its own), which the served tables and KJT then leave
        out (``pipeline.inference.model.fold_dense_keys``). Folded into what reads them
        rather than concatenated (a copy of ``pooled``: 3% of a 4096-row request): the
        first product adds ``dense @ (rows W_dᵀ)`` (with the bias, in the same op), a
        selection's FM field sum ``dense @ (rows at their places)`` and the FM's sum of
        squares ``dense² @ |rows_i|²``.

        Raises:
            ValueError: for a model with a bottom MLP (it has no dense keys) or a Gram term
                (a learned projection not re-based to orthonormal rows).
        """
        if self.dense_arch is not None or self.gram is not None:
            raise ValueError("dense keys fold into a model without a bottom MLP or a Gram term only")
        width = rows.shape[1]
        self.dense_map = rows @ self.first_t[:width]
        if self.fm and self.places is not None:
            self.dense_sums = rows.new_zeros(rows.shape[0], self.embedding_dim).index_add_(1, self.places[:width], rows)
            self.places = self.places[width:]
        self.first_t = self.first_t[width:]
        self.dense_norms = rows.square().sum(dim=1) if self.fm else None
        self.dense_row_bytes = width * rows.element_size()  # one stored value per column

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # Layers are applied as functions, not module calls: at batch 1 the calls were a
        # third of the interaction's time (56 -> 38 µs for DeepFM, one thread).
        x = pooled if self.dense_arch is None else torch.cat([self.dense_arch(dense), pooled], dim=1)
        # The dense terms with the bias, then the pooled columns' product added by the same op.
        bias = self.first_bias if self.dense_map is None else torch.addmm(self.first_bias, dense, self.dense_map)
        first = torch.addmm(bias, x, self.first_t)
        out = None
        for (start, width), rest in zip(self.mlp_parts, self.rests):
            part = first.narrow(1, start, width)
            for layer in rest:
                part = linear(torch.relu(part), layer.weight, layer.bias)
            out = part if out is None else out + part
        tail = first.narrow(1, self.tail_start, first.shape[1] - self.tail_start)
        logits = tail @ self.direct if out is None else torch.addmv(out.squeeze(1), tail, self.direct)
        if not self.fm:
            return logits
        if self.places is None:  # + ½|Σ_i v_i|², the sums being tail columns
            logits = torch.addmv(logits, tail.square(), self.half_sums)
        else:  # one add per column, not a [C, K] product (4.5 -> 2.4 ms at 4096 × 1,248)
            field_sum = x.new_zeros(x.shape[0], self.embedding_dim).index_add_(1, self.places, x)
            if self.dense_sums is not None:
                field_sum = torch.addmm(field_sum, dense, self.dense_sums)
            logits = torch.add(logits, field_sum.square().sum(dim=1), alpha=0.5)
        if self.gram is not None:
            return torch.sub(logits, (x * (x @ self.gram)).sum(dim=1), alpha=0.5)
        # The norm reads x once, x * x writes a copy first (0.4 vs 1.2 ms).
        logits = torch.sub(logits, torch.linalg.vector_norm(x, dim=1).square(), alpha=0.5)
        if self.dense_norms is not None:  # minus ½ Σ_d dense_d² |row_d|²
            logits = torch.addmv(logits, dense.square(), self.dense_norms, alpha=-0.5)
        return logits
