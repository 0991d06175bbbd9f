"""A principal basis per feature: rotate each feature's rows before pruning columns.

A plan keeps coordinate columns, but the searched rows ``E ⊙ α`` do not carry their
signal along coordinates: on the 1M-row worlds the best 8 columns of the tail blocks
keep 0.51-0.57 of the count-weighted energy where the top 8 principal directions keep
0.87-0.93 (``benchmarks/column_basis.py``). So the feature's rows are first turned by
the eigenvectors ``R`` of their count-weighted Gram matrix ``Σ_id count(id) ẽ ẽᵀ``
(``ẽ = E[id] ⊙ α[block(id)]``), largest eigenvalue first; column ``j`` of the rotated
table is the ``j``-th principal coordinate, and the plan prunes those columns as it
pruned coordinates (α is folded in, so it scores them with α = 1). The learned (NIS-ME)
projection starts from ``Rᵀ``: a group of width ``w`` maps its ``w`` coordinates back
through the matching ``w`` eigenvectors, the best rank-``w`` approximation of its rows
in the count-weighted sense, and exactly ``ẽ`` at full width.

The count weighting uses a group's mean count (its train occurrences over its ids): ids
of one group have near-equal frequency ranks.

Example:
    >>> from plans.structured import Group
    >>> g = [Group("a", 0, 0, 2)]
    >>> gram = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)  # rows along (1, 1)
    >>> basis, sum_sq = principal_basis(g, gram, torch.ones(1, 2), [4])
    >>> sum_sq.round(decimals=6).tolist()  # all the energy in the first principal column
    [[2.0, 0.0]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from plans.structured import Group

BASES = ("columns", "principal")


def principal_basis(
    groups: Sequence[Group], gram: torch.Tensor, alpha: torch.Tensor, mass
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per feature its rotation ``R`` (``[K, K]``, orthonormal eigenvector columns,
    largest eigenvalue first), and per group the column sums of squares of its α-scaled
    rows in that basis (``[G, K]``, ``diag(Rᵀ G̃ R)``): what the plan scores with α = 1.

    Args:
        groups: the plan's groups.
        gram: ``[G, K, K]`` per group ``Σ E[id]ᵀ E[id]`` (``sharding.table_stats.group_gram``).
        alpha: ``[α rows, K]``.
        mass: train occurrences per group (``group_mass``).
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu()
    scale = alpha[torch.tensor([g.block for g in groups])]  # [G, K]
    scaled = gram.double() * scale[:, :, None] * scale[:, None, :]  # diag(α) G diag(α)
    weight = torch.as_tensor(np.asarray(mass, dtype=np.float64)) / torch.tensor([float(g.rows) for g in groups])
    basis, sum_sq = {}, torch.zeros(len(groups), gram.shape[1], dtype=torch.float64)
    for key in dict.fromkeys(g.key for g in groups):
        members = torch.tensor([i for i, g in enumerate(groups) if g.key == key])
        weighted = (scaled[members] * weight[members, None, None]).sum(0)
        _, vectors = torch.linalg.eigh(weighted)
        rotation = vectors.flip(1)  # eigh sorts ascending
        basis[key] = rotation.float()
        sum_sq[members] = torch.einsum("kj,gkl,lj->gj", rotation, scaled[members], rotation).clamp_min(0)
    return basis, sum_sq


def basis_to_json(basis: dict[str, torch.Tensor]) -> dict[str, list]:
    return {key: rotation.tolist() for key, rotation in basis.items()}


def basis_from_json(doc: dict[str, list]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(rows, dtype=torch.float32) for key, rows in doc.items()}
