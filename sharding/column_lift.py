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
    >>> lift = ColumnLift(2, 2, places=torch.tensor([1, 2]), slots=column_slots(torch.tensor([1, 2]), 2, 2))
    >>> lift.fold(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))   # the weights of places 1 and 2
    tensor([[2., 3.]])
    >>> lift.field_sums(torch.tensor([[5.0, 6.0]]))      # Σ_f v_f, Σ_f |v_f|²
    (tensor([[6., 5.]]), tensor([61.]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def column_slots(places: torch.Tensor, num_fields: int, embedding_dim: int) -> torch.Tensor:
    """``[F, W]``: field ``f``'s pooled columns in order (they are consecutive), padded
    with ``C`` (a zero column appended to ``x``) to the widest field's ``W``.

    Example:
        >>> column_slots(torch.tensor([1, 4, 5, 6]), 3, 4)
        tensor([[0, 4, 4],
                [1, 2, 3],
                [4, 4, 4]])
    """
    fields = places // embedding_dim
    counts = torch.bincount(fields, minlength=num_fields)
    width = max(int(counts.max()), 1) if fields.numel() else 1
    position = torch.arange(fields.numel()) - (torch.cumsum(counts, 0) - counts)[fields]
    slots = torch.full((num_fields * width,), fields.numel(), dtype=torch.int64)
    slots[fields * width + position] = torch.arange(fields.numel())
    return slots.view(num_fields, width)


@dataclass
class ColumnLift:
    """``x -> flat(fields)`` of ``C`` pooled columns (see the module docstring).

    Args:
        num_fields, embedding_dim: ``F`` and ``K``.
        places: ``[C]``, each column's place in the flattened fields (learned: its
            field times ``K`` plus its starting column).
        slots: ``column_slots(places, F, K)``.
        rows: ``[C, K]`` projection rows (learned), or ``None`` (a selection).
    """

    num_fields: int
    embedding_dim: int
    places: torch.Tensor
    slots: torch.Tensor
    rows: Optional[torch.Tensor] = None

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``[out, C]``: ``weight`` (``[out, F * K]``) times the lift's transpose."""
        if self.rows is None:
            return weight.index_select(1, self.places)
        blocks = weight.view(weight.shape[0], self.num_fields, self.embedding_dim)
        return torch.einsum("ock,ck->oc", blocks.index_select(1, self.places // self.embedding_dim), self.rows)

    def field_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_f v_f, Σ_f |v_f|²)`` of the fields ``v`` of ``x`` (``[B, K]``, ``[B]``).

        A selection puts every column in a place of its own: one add per column, and the
        norm of ``x``. A learned projection builds the fields, all features in one
        batched product of their padded columns (``slots``) and projection rows."""
        if self.rows is None:
            sums = x.new_zeros(x.shape[0], self.embedding_dim).index_add_(1, self.places % self.embedding_dim, x)
            return sums, torch.linalg.vector_norm(x, dim=1).square()
        padded = self.slots.view(-1)
        columns = torch.nn.functional.pad(x, (0, 1)).index_select(1, padded).view(x.shape[0], *self.slots.shape)
        rows = torch.nn.functional.pad(self.rows, (0, 0, 0, 1)).index_select(0, padded).view(*self.slots.shape, -1)
        fields = torch.einsum("bfw,fwk->bfk", columns, rows)
        return fields.sum(dim=1), torch.linalg.vector_norm(fields, dim=(1, 2)).square()
