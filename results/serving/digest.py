"""One line per (world, batch, tables, model) of a ``bench_both_worlds.sh`` output: its
p50, p99 and tensor-part ratios over the unpruned model, and its p50 ms, run by run.

    python results/serving/digest.py out.md
"""

from __future__ import annotations

import sys
from collections import defaultdict


def digest(lines) -> dict[tuple, list[tuple[float, ...]]]:
    """``(world, batch, tables, model) -> [(p50 ratio, p99 ratio, tensor ratio, p50 ms)]``,
    one tuple per run; unpruned and unfolded models left out."""
    runs, world = defaultdict(list), None
    for line in lines:
        if line.startswith("## "):
            world = line.split()[1].rstrip(",")
            continue
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if not cells or not cells[0].isdigit() or cells[2] == "unpruned" or "unfolded" in cells[2]:
            continue
        batch, tables, model, p50_ms = int(cells[0]), cells[1], cells[2], float(cells[3])
        runs[world, batch, tables, model].append((*map(float, cells[6:9]), p50_ms))
    return runs


def main() -> None:
    with open(sys.argv[1]) as f:
        runs = digest(f)
    for (world, batch, tables, model), values in sorted(runs.items()):
        column = ["/".join(f"{v[i]:.2f}" for v in values) for i in range(4)]
        print(f"{world:9s} {batch:5d} {tables:5s} {model:16s} p50 {column[0]}  p99 {column[1]}  "
              f"tensor {column[2]}  ms {column[3]}")


if __name__ == "__main__":
    main()
