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
    >>> folded.first                       # both heads' first layers, on the 2 columns
    Linear(in_features=2, out_features=4, bias=True)
"""

from __future__ import annotations

import copy
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

    Args:
        dense_arch: the model's bottom MLP (its output is the first field), or ``None``.
        heads: the model's linear and MLP heads that read ``flat(fields)`` (copied; their
            first layers are folded and stacked into ``first``).
        lift: ``[X, F' * K]``, ``x -> flat(fields)``.
        gram: ``lift @ liftᵀ``, or ``None`` where it is the identity.
        embedding_dim: ``K``.
        fm: whether the model adds ``Σ_{i<j} <v_i, v_j>``.
    """

    def __init__(
        self, dense_arch: Optional[nn.Module], heads: Sequence[nn.Module], lift: torch.Tensor,
        gram: Optional[torch.Tensor], embedding_dim: int, fm: bool,
    ) -> None:
        super().__init__()
        self.dense_arch, self.fm = dense_arch, fm
        fields = lift.shape[1] // embedding_dim
        self.embedding_dim = embedding_dim
        # Σ_i v_i: a selection's columns added at their places, else a product with lift S,
        # stacked with the heads' first layers.
        places = field_places(lift, embedding_dim)
        firsts = [first_linear(h) for h in heads]
        weights = [f.weight.detach() @ lift.T for f in firsts]
        biases = [f.bias.detach() if f.bias is not None else torch.zeros(f.out_features) for f in firsts]
        if fm and places is None:
            weights.append((lift @ torch.eye(embedding_dim).repeat(fields, 1)).T)
            biases.append(torch.zeros(embedding_dim))
        self.first = nn.Linear(lift.shape[0], sum(w.shape[0] for w in weights))
        with torch.no_grad():
            self.first.weight.copy_(torch.cat(weights))
            self.first.bias.copy_(torch.cat(biases))
        self.splits = [w.shape[0] for w in weights]
        self.rests = nn.ModuleList([rest_of(h) for h in heads])
        self.places: Optional[torch.Tensor]
        self.register_buffer("places", places, persistent=False)
        self.gram: Optional[torch.Tensor]
        self.register_buffer("gram", gram, persistent=False)
        # Folded dense keys (``take_dense_rows``): [D, first outputs (+ K)] and [D].
        self.dense_map: Optional[torch.Tensor]
        self.register_buffer("dense_map", None, persistent=False)
        self.dense_norms: Optional[torch.Tensor]
        self.register_buffer("dense_norms", None, persistent=False)
        self.dense_bias: Optional[torch.Tensor]  # the first layer's bias (and K zeros): added with dense_map
        self.register_buffer("dense_bias", None, persistent=False)
        self.dense_row_bytes = 0

    def take_dense_rows(self, rows: torch.Tensor) -> None:
        """Read the first ``C_d`` pooled columns as ``dense @ rows`` (``rows``: ``[D, C_d]``)
        instead of from ``pooled``, which then starts after them: the columns of the
        one-row tables of weighted dense keys (such a lookup pools the dense value times
        the row; each key's columns its own), which the served tables and KJT then leave
        out (``pipeline.inference.model.fold_dense_keys``). Folded into what reads them
        rather than concatenated (a copy of ``pooled``: 3% of a 4096-row request): the
        first layer adds ``dense @ (rows W_dᵀ)``, a selection's FM field sum ``dense @
        (rows at their places)`` and the FM's sum of squares ``dense² @ |rows_i|²``.

        Raises:
            ValueError: for a model with a bottom MLP (it has no dense keys) or a Gram term
                (a learned projection not re-based to orthonormal rows).
        """
        if self.dense_arch is not None or self.gram is not None:
            raise ValueError("dense keys fold into a model without a bottom MLP or a Gram term only")
        width, weight = rows.shape[1], self.first.weight.detach()
        maps = [rows @ weight[:, :width].T]
        if self.fm and self.places is not None:
            maps.append(rows.new_zeros(rows.shape[0], self.embedding_dim).index_add_(1, self.places[:width], rows))
            self.places = self.places[width:]
        first = nn.Linear(weight.shape[1] - width, weight.shape[0])
        with torch.no_grad():
            first.weight.copy_(weight[:, width:])
            first.bias.copy_(self.first.bias)
        self.first = first
        self.dense_map = torch.cat(maps, dim=1)
        self.dense_bias = torch.cat([first.bias.detach(), rows.new_zeros(self.dense_map.shape[1] - weight.shape[0])])
        self.dense_norms = rows.square().sum(dim=1) if self.fm else None
        self.dense_row_bytes = width * rows.element_size()  # one stored value per column

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # Layers are applied as functions, not module calls: at batch 1 the calls were a
        # third of the interaction's time (56 -> 38 µs for DeepFM, one thread).
        x = pooled if self.dense_arch is None else torch.cat([self.dense_arch(dense), pooled], dim=1)
        if self.dense_map is None:
            first, dense_terms = linear(x, self.first.weight, self.first.bias), None
        else:  # the dense terms with the bias, the pooled columns' product added by the same op
            dense_terms = torch.addmm(self.dense_bias, dense, self.dense_map)
            first = torch.addmm(dense_terms[:, : self.first.out_features], x, self.first.weight.T)
        parts = first.split(self.splits, dim=1)
        out = None
        for part, rest in zip(parts, self.rests):
            for layer in rest:
                part = linear(torch.relu(part), layer.weight, layer.bias)
            out = part if out is None else out + part
        out = out.squeeze(1)
        if not self.fm:
            return out
        if self.places is None:
            field_sum = parts[-1]
        else:  # one add per column, not a [C, K] product (4.5 -> 2.4 ms at 4096 × 1,248)
            field_sum = x.new_zeros(x.shape[0], self.embedding_dim).index_add_(1, self.places, x)
            if dense_terms is not None:
                field_sum = field_sum + dense_terms[:, -self.embedding_dim :]
        square_of_sum = field_sum.square().sum(dim=1)
        if self.gram is None:  # the norm reads x once, x * x writes a copy first (0.4 vs 1.2 ms)
            pairs = square_of_sum - torch.linalg.vector_norm(x, dim=1).square()
            if self.dense_norms is not None:  # minus Σ_d dense_d² |row_d|²
                pairs = torch.addmv(pairs, dense.square(), self.dense_norms, alpha=-1)
        else:
            pairs = square_of_sum - (x * (x @ self.gram)).sum(dim=1)
        return torch.add(out, pairs, alpha=0.5)
