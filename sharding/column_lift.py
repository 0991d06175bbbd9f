"""The repacked embedding's fields as a linear map of its pooled columns, for training
folded onto those columns (``pipeline.models.column_fold``).

The ``C`` pooled slab columns ``x`` (``RepackedEmbedding.pooled_columns``) make the
``[B, F, K]`` fields: a selection places column ``c`` at ``places[c]`` of the flattened
fields; a learned (NIS-ME) projection adds ``x[c] · rows[c]`` to field ``places[c] // K``
(``rows[c]`` is the projection row of that stored column). A layer reading
``flat(fields)`` through ``W`` reads ``x`` through ``fold(W)``, ``[out, C]`` instead of
``[out, F * K]``, and an FM needs only ``field_sums``. ``rows`` come from the live
projections each step, so their gradients flow through both.

Example:
    >>> places = torch.tensor([1, 2])
    >>> lift = ColumnLift(2, 2, places, FieldColumns.of(places, 2, 2))
    >>> lift.fold(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))   # the weights of places 1 and 2
    tensor([[2., 3.]])
    >>> lift.field_sums(torch.tensor([[5.0, 6.0]]))      # Σ_f v_f, Σ_f |v_f|²
    (tensor([[6., 5.]]), tensor([61.0000]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sharding.squared_norm import squared_norm

torch.fx.wrap("squared_norm")  # a leaf when the train pipeline traces the model


@dataclass(frozen=True)
class FieldColumns:
    """Which pooled columns each field reads (they are consecutive, in field order).

    Attributes:
        slots: ``[F, W]``, field ``f``'s columns padded with ``C`` to the widest ``W``.
        positions: ``[C]``, each column's index in ``slots.view(-1)``.
        widths: columns per field.

    Example:
        >>> layout = FieldColumns.of(torch.tensor([1, 4, 5, 6]), 3, 4)
        >>> layout.slots, layout.positions, layout.widths
        (tensor([[0, 4, 4],
                [1, 2, 3],
                [4, 4, 4]]), tensor([0, 3, 4, 5]), (1, 3, 0))
    """

    slots: torch.Tensor
    positions: torch.Tensor
    widths: tuple[int, ...]

    @staticmethod
    def of(places: torch.Tensor, num_fields: int, embedding_dim: int) -> "FieldColumns":
        fields = places // embedding_dim
        counts = torch.bincount(fields, minlength=num_fields)
        width = max(int(counts.max()), 1) if fields.numel() else 1
        positions = fields * width + torch.arange(fields.numel()) - (torch.cumsum(counts, 0) - counts)[fields]
        slots = torch.full((num_fields * width,), fields.numel(), dtype=torch.int64)
        slots[positions] = torch.arange(fields.numel())
        return FieldColumns(slots.view(num_fields, width), positions, tuple(counts.tolist()))


@dataclass
class ColumnLift:
    """``x -> flat(fields)`` of ``C`` pooled columns (see the module docstring).

    Args:
        num_fields, embedding_dim: ``F`` and ``K``.
        places: ``[C]``, each column's place in the flattened fields (learned: its
            field times ``K`` plus its starting column).
        columns: ``FieldColumns.of(places, F, K)``.
        rows: ``[C, K]`` projection rows (learned), or ``None`` (a selection).
    """

    num_fields: int
    embedding_dim: int
    places: torch.Tensor
    columns: FieldColumns
    rows: Optional[torch.Tensor] = None

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``[out, C]``: ``weight`` (``[out, F * K]``) times the lift's transpose.

        Learned: per field its ``[out, K]`` block times its padded rows, one batched
        product of ``F × out × K × W`` multiply-adds (a gather of ``[out, C, K]``
        blocks and a sum cost 4x more), then the real columns."""
        if self.rows is None:
            return weight.index_select(1, self.places)
        slots = self.columns.slots
        blocks = weight.view(weight.shape[0], self.num_fields, self.embedding_dim).transpose(0, 1)
        rows = torch.nn.functional.pad(self.rows, (0, 0, 0, 1)).index_select(0, slots.view(-1))
        padded = torch.bmm(blocks, rows.view(*slots.shape, -1).transpose(1, 2))  # [F, out, W]
        return padded.transpose(0, 1).reshape(weight.shape[0], -1).index_select(1, self.columns.positions)

    def field_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_f v_f, Σ_f |v_f|²)`` of the fields ``v`` of ``x`` (``[B, K]``, ``[B]``).

        A selection puts every column in a place of its own: one add per column, and the
        norm of ``x``. A learned projection builds the fields: one product per field (a batched product of
        padded fields costs 1.7x more, forward and backward, at 1024 × 39 × 16)."""
        if self.rows is None:
            sums = x.new_zeros(x.shape[0], self.embedding_dim).index_add_(1, self.places % self.embedding_dim, x)
            return sums, squared_norm(x, 1)
        widths = list(self.columns.widths)
        columns, rows = torch.split(x, widths, 1), torch.split(self.rows, widths)  # indexed: FX traces them
        products = [columns[f] @ rows[f] for f in range(len(widths))]
        fields = torch.stack(products, dim=1)
        return fields.sum(dim=1), squared_norm(fields, (1, 2))
