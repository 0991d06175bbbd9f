"""What the repacked-model benchmarks start from: a search model and its structured plans.

Either a finished search run (``trained_search``), or fresh synthetic rows and an
untrained search model with a seeded α (``synthetic_search``: latency, memory and step
times do not depend on training, only on the plan's shape). ``structured_plans`` prunes
it for each target CR as ``dnis prune --cr`` does (8 ranges per block; τ allocation, or
``--allocation value``; on the tables' own or, ``--basis principal``, their principal columns).

Example:
    >>> cfg, layout, blocking, search, raw = synthetic_search(Path("runs/bench"), 300_000)  # doctest: +SKIP
    >>> plans, _ = structured_plans(cfg, layout, blocking, search, [10.0, 20.0])    # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import launch  # noqa: E402, F401  (its upstream-notice filters: one place for every entry point)
from launch.prune import column_statistics  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import preprocess, synth  # noqa: E402
from pipeline.data.features import FeatureLayout  # noqa: E402
from pipeline.data.metadata import DatasetMeta  # noqa: E402
from pipeline.loop import BEST  # noqa: E402
from pipeline.prune.knapsack import value_plan_for_cr  # noqa: E402
from pipeline.prune.plan import CR_TOLERANCE, group_mass, group_ranges, plan_for_cr  # noqa: E402
from pipeline.search.blocking import compute_blocking  # noqa: E402
from pipeline.tasks import build_search_task  # noqa: E402
from plans.blocking import Blocking  # noqa: E402
from plans.bytes import unpruned_bytes  # noqa: E402
from plans.structured import StructuredPlan  # noqa: E402
from sharding.checkpoint import load_checkpoint  # noqa: E402


def synthetic_search(scratch: Path, rows: int):
    """A synthetic dataset and an untrained search task with a seeded α:
    ``(config, layout, blocking, search task, raw rows)``."""
    raw = scratch / "raw.txt"
    synth.main(["--rows", str(rows), "--seed", "5", "--out", str(raw)])
    preprocess.main(["--output", str(scratch / "data"), "--dataset", "synthetic", "--workers", "2", str(raw)])
    cfg = load_config([ROOT / "configs" / "synthetic.yaml"], [f"data.path={scratch / 'data'}"])
    layout = layout_of(cfg)
    blocking = compute_blocking(layout.counts, cfg.blocking.num_blocks, cfg.blocking.mode, cfg.blocking.per_field)
    torch.manual_seed(0)  # the tables' init, so the plans are the same from run to run
    task = build_search_task(cfg, layout, blocking, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    task.model.embedding.alpha.data = torch.rand(task.model.embedding.alpha.shape, generator=generator)
    return cfg, layout, blocking, task, raw


def trained_search(run_dir: Path, raw: str | None = None):
    """The best checkpoint of a finished search run, as ``synthetic_search`` returns."""
    cfg = load_config([run_dir / "config.yaml"])
    layout = layout_of(cfg)
    blocking = Blocking.from_json(json.loads((run_dir / "blocking.json").read_text()))
    task = build_search_task(cfg, layout, blocking, torch.device("cpu"))
    load_checkpoint(run_dir / "checkpoints" / BEST, task, local=True)
    return cfg, layout, blocking, task, Path(raw) if raw else None


def layout_of(cfg) -> FeatureLayout:
    return FeatureLayout.from_meta(DatasetMeta.load(cfg.data.path), cfg.data.dense_mode)


def structured_plans(
    cfg, layout: FeatureLayout, blocking: Blocking, search, crs: Sequence[float], ranges_per_block: int = 8,
    allocation: str = "threshold", width_step: int = 1, min_row_lookups: float = 0,
    widths: Optional[Sequence[int]] = None, basis: str = "columns", bits: Optional[int] = None,
) -> tuple[dict[float, StructuredPlan], Optional[dict]]:
    """Per target CR, the plan ``dnis prune --cr`` makes of ``search`` with ``--allocation``,
    ``--width-step``, ``--min-row-lookups``, ``--widths``, ``--basis`` (the projection:
    selection, learned for the principal basis) and ``--bits`` (value allocation: the
    budget in quantized bytes), and the basis' rotations (or ``None``)."""
    if bits is not None and allocation != "value":
        raise ValueError("bits: a budget in quantized bytes needs the value allocation")
    groups = group_ranges(blocking, layout.num_embeddings, ranges_per_block)
    alpha, mass = search.model.embedding.alpha.detach(), group_mass(groups, layout.counts)
    sum_sq, alpha, rotations = column_statistics(search, groups, alpha, mass, basis)
    projection = projection_of(rotations)
    if allocation == "value":
        unpruned = unpruned_bytes(sum(g.rows for g in groups), cfg.model.embedding_dim)
        # As dnis prune: the row-sharing floor halves while the plan would spend too little.
        return {
            cr: value_plan_for_cr(groups, sum_sq, alpha, mass, unpruned / cr, projection, width_step,
                                  min_row_lookups, CR_TOLERANCE, widths, bits)[0]
            for cr in crs
        }, rotations
    return {cr: plan_for_cr(groups, sum_sq, alpha, mass, cr, projection) for cr in crs}, rotations


def projection_of(rotations: Optional[dict]) -> str:
    """The projection a plan ships with: learned on a principal basis, else selection."""
    return "selection" if rotations is None else "learned"
