"""Summaries of a searched α: one row per α row (block), for logs, reports and the CLI.

Example:
    >>> from pipeline.search.blocking import compute_blocking
    >>> blocking = compute_blocking({"a": [[9, 2], [1, 2]]}, num_blocks=2)
    >>> alpha = torch.tensor([[1.0, 0.8, 0.6, 0.0], [0.2, 0.0, 0.0, 0.0]])
    >>> [r["dims_over_half"] for r in alpha_rows(alpha, blocking)]
    [3, 0]
    >>> print(format_alpha_table(alpha, blocking).splitlines()[0])
    block  features  share of occurrences  mean α  α≥0.5 dims  max α
"""

from __future__ import annotations

import torch

from plans.blocking import Blocking


def alpha_rows(alpha: torch.Tensor, blocking: Blocking) -> list[dict]:
    """Per α row: its block, features, share of train occurrences and α statistics."""
    alpha = alpha.detach().float().cpu()
    total_mass = max(sum(blocking.block_mass), 1)
    rows = []
    for row in range(alpha.shape[0]):
        values = alpha[row]
        label = str(row % blocking.num_blocks)
        if blocking.per_field:
            label = f"{blocking.keys[row // blocking.num_blocks]}/{label}"
        rows.append({
            "block": label,
            "features": int(blocking.block_features[row]),
            "mass_share": blocking.block_mass[row] / total_mass,
            "mean_alpha": float(values.mean()),
            "max_alpha": float(values.max()),
            "dims_over_half": int((values >= 0.5).sum()),
        })
    return rows


def format_alpha_table(alpha: torch.Tensor, blocking: Blocking) -> str:
    """A fixed-width table of ``alpha_rows`` (block 0 = most frequent features)."""
    lines = ["block  features  share of occurrences  mean α  α≥0.5 dims  max α"]
    for r in alpha_rows(alpha, blocking):
        lines.append(
            f"{r['block']:>5}  {r['features']:>8}  {r['mass_share']:>20.4f}  "
            f"{r['mean_alpha']:>6.3f}  {r['dims_over_half']:>10}  {r['max_alpha']:>5.3f}"
        )
    return "\n".join(lines)
