"""How much of a search's embeddings ``w`` kept columns carry, against the best ``w``
directions: does pruning whole coordinate columns waste the bytes it keeps?

A structured prune with the selection projection keeps, per (feature, block), ``w`` of
the ``K`` coordinate columns of the α-scaled rows ``E ⊙ α``. The best any ``w`` columns
can keep of the rows' count-weighted energy ``Σ_i c_i |e_i|²`` (``c_i``: the id's train
occurrences, so the energy is what the model reads per lookup) is that of the ``w``
columns with the most energy; the best any rank-``w`` linear map can keep is that of the
top ``w`` principal directions (singular values of ``diag(√c) E``). Prints, per block
and ``w``, both shares and their ratio (columns ÷ directions: 1.0 means a column
selection loses nothing against a learned ``w``-dimensional basis).

    python benchmarks/column_basis.py [--run-dir runs/cmp1m/out/longtail/deepfm/seed0/search] [--widths 4 8 16]

Without ``--run-dir`` an untrained synthetic search stands in (its numbers say nothing
about trained tables; it only runs the code).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

# search_setup puts the repository on sys.path: import it first.
from search_setup import synthetic_search, trained_search

from sharding.field_embedding import table_name


def id_counts(runs: list[list[int]], rows: int) -> np.ndarray:
    """Per id its train occurrences, from the layout's run-length ``[[count, repeat], ...]``."""
    return np.repeat([c for c, _ in runs], [r for _, r in runs]).astype(np.float64)[:rows]


def energy_kept(rows: np.ndarray, counts: np.ndarray, width: int) -> tuple[float, float, float]:
    """``(total, by the best width columns, by the top width directions)`` of the
    count-weighted energy of ``rows`` ``[n, K]``."""
    weighted = rows * np.sqrt(counts)[:, None]
    per_column = (weighted**2).sum(axis=0)
    singular = np.linalg.svd(weighted, compute_uv=False)
    return float(per_column.sum()), float(np.sort(per_column)[::-1][:width].sum()), float((singular[:width] ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished search run (default: synthetic, untrained)")
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows (without --run-dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dnis-bench-") as scratch:
        if args.run_dir:
            _, layout, blocking, search, _ = trained_search(args.run_dir)
        else:
            _, layout, blocking, search, _ = synthetic_search(Path(scratch), args.rows)
    embedding = search.model.embedding
    totals: dict[tuple[int, int], np.ndarray] = {}
    with torch.no_grad():
        for key in layout.keys:
            n = layout.num_embeddings[key]
            blocks = torch.as_tensor(blocking.block_of(key, range(n)))
            scaled = (embedding.ebc.embedding_bags[table_name(key)].weight * embedding.alpha[blocks]).double().numpy()
            counts, blocks = id_counts(layout.counts[key], n), blocks.numpy()
            for block in np.unique(blocks):
                mine = blocks == block
                for width in args.widths:
                    kept = energy_kept(scaled[mine], counts[mine], width)
                    totals[block, width] = totals.get((block, width), np.zeros(3)) + kept
    print("| block | w | energy share, best w columns | top w directions | ratio |")
    print("|---|---|---|---|---|")
    for (block, width), (total, columns, directions) in sorted(totals.items()):
        print(f"| {block} | {width} | {columns / total:.3f} | {directions / total:.3f} | {columns / directions:.2f} |")


if __name__ == "__main__":
    main()
