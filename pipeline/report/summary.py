"""The JSON-ready report dict (``build_report``) of the runs read by ``runs``: per-plan
kept widths, the CR table, parameter counts and wall times per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from pipeline.config import Config, load_config
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import DatasetMeta
from pipeline.report.runs import (
    RetrainRun, SearchRun, StructuredModel, load_retrain, load_search, read_json, retrain_dirs,
    stage_wall_s,
)
from pipeline.tasks import build_train_task
from plans.blocking import Blocking
from plans.bytes import VALUE_BYTES
from plans.structured import StructuredPlan

METHODS = ("reference", "search (α)", "structured", "structured+retrain", "fine-grained")
PLOTS = ("alpha.png", "dims.png", "cr_auc.png", "params.png")


def mean_widths(plan: StructuredPlan, blocking: Blocking) -> dict[str, list[Optional[float]]]:
    """Per feature, per block: the kept width averaged over its ids (None: no ids)."""
    weighted = {k: np.zeros(blocking.num_blocks) for k in blocking.keys}
    rows = {k: np.zeros(blocking.num_blocks) for k in blocking.keys}
    for g in plan.groups:
        block = g.group.block - blocking.row_offset(g.group.key)
        weighted[g.group.key][block] += g.group.rows * g.width
        rows[g.group.key][block] += g.group.rows
    return {
        k: [float(w / n) if n else None for w, n in zip(weighted[k], rows[k])]
        for k in blocking.keys
    }


def structured_models(search: SearchRun, retrains: list[RetrainRun]) -> list[StructuredModel]:
    """The search's prune, then every retrain's shipped model (when its plan is known)."""
    models = [search.pruned] if search.pruned else []
    return models + [r.model for r in retrains if r.model is not None]


def first_of_each(
    models: list[StructuredModel], key: Callable[[StructuredModel], Any]
) -> list[StructuredModel]:
    """The first model of each distinct ``key(model)``, in order."""
    unique: dict[Any, StructuredModel] = {}
    for model in models:
        unique.setdefault(key(model), model)
    return list(unique.values())


def distinct_plans(search: SearchRun, retrains: list[RetrainRun]) -> list[StructuredModel]:
    """One model per distinct plan (widths and prune times do not depend on projection)."""
    return first_of_each(structured_models(search, retrains), lambda m: m.plan)


def cr_row(
    method: str, source: str, cr: float, embedding_bytes: Optional[int],
    test: Optional[dict], wall_s: Optional[float], target_cr: Optional[float] = None,
) -> dict:
    """One model of the CR table: the CR it was pruned for (``target_cr``) and reached."""
    test = test or {}
    return {
        "method": method, "source": source, "target_cr": target_cr, "compression_ratio": cr,
        "embedding_bytes": embedding_bytes, "auc": test.get("auc"), "logloss": test.get("logloss"),
        "wall_s": wall_s,
    }


def cr_table(search: SearchRun, retrains: list[RetrainRun], reference: Optional[dict]) -> list[dict]:
    """One row per model, sorted by CR (then by ``METHODS`` order)."""
    full = search.unpruned_embedding_bytes
    rows = [cr_row("search (α)", "result.json", 1.0, full, search.result["test"], search.wall_s)]
    if reference is not None:
        rows.append(cr_row("reference", reference["source"], 1.0, reference["embedding_bytes"],
                           reference["result"]["test"], reference["wall_s"]))
    for r in retrains:
        cr, size = r.result["compression_ratio"], r.result["embedding_bytes"]
        prune_wall, target = (r.model.prune_wall_s, r.model.target_cr) if r.model else (None, None)
        source = f"{r.source}/result.json"
        rows.append(cr_row("structured", source, cr, size, r.result.get("before_retrain"), prune_wall, target))
        rows.append(cr_row("structured+retrain", source, cr, size, r.result["test"], r.wall_s, target))
    if search.pruned and not any(r.model and r.model.plan == search.pruned.plan for r in retrains):
        p = search.pruned
        rows.append(cr_row(
            "structured", p.plan_source, p.compression_ratio, p.embedding_bytes, None, p.prune_wall_s, p.target_cr
        ))
    for f in search.fine_grained:
        rows.append(cr_row("fine-grained", "fine_prune.json", f["compression_ratio"], f["coo_bytes"],
                           f["test"], f.get("wall_s"), f.get("target_cr")))
    return sorted(rows, key=lambda row: (row["compression_ratio"], METHODS.index(row["method"])))


def dense_parameters(cfg: Config) -> Optional[int]:
    """Parameters of the configured model outside its embeddings (None: no dataset)."""
    if not (Path(cfg.data.path) / "metadata.json").is_file():
        return None
    layout = FeatureLayout.from_config(DatasetMeta.load(cfg.data.path), cfg.data)
    task = build_train_task(cfg, layout, torch.device("meta"))
    return sum(p.numel() for name, p in task.named_parameters() if "embedding" not in name)


def structured_parameters(model: StructuredModel) -> dict:
    """Stored values (rows × width) and learned projection matrices (width × K)."""
    values = sum(g.stored_rows * g.width for g in model.plan.groups)
    widths = sum(g.width for g in model.plan.groups)
    projection = widths * model.plan.embedding_dim if model.projection == "learned" else 0
    return parameter_row("structured", f"{model.plan_source} ({model.projection})",
                         model.compression_ratio, values, projection)


def parameter_row(method: str, source: str, cr: float, values: int, projection: int = 0) -> dict:
    return {
        "method": method, "source": source, "compression_ratio": cr, "values": values,
        "projection_params": projection, "embedding": values + projection,
    }


def parameter_counts(search: SearchRun, retrains: list[RetrainRun]) -> dict:
    """Embedding parameters unpruned and per pruned model; dense parameters apart."""
    shipped = first_of_each(structured_models(search, retrains), lambda m: (m.plan, m.projection))
    fine = [parameter_row("fine-grained", "fine_prune.json", f["compression_ratio"], f["nnz"])
            for f in search.fine_grained]
    return {
        "embedding_unpruned": search.unpruned_embedding_bytes // VALUE_BYTES,
        "embedding_pruned": [structured_parameters(m) for m in shipped] + fine,
        "dense": dense_parameters(search.cfg),
    }


def wall_times(search: SearchRun, retrains: list[RetrainRun], reference: Optional[dict]) -> dict:
    """Seconds per stage, and their sum over search, prunes and retrains (the stages
    without a recorded time are listed in ``missing``)."""
    prune = {m.plan_source: m.prune_wall_s for m in distinct_plans(search, retrains)}
    retrain = {r.source: r.wall_s for r in retrains}
    stages = {
        "search": search.wall_s,
        **{f"prune {source}": s for source, s in prune.items()},
        **{f"retrain {source}": s for source, s in retrain.items()},
    }
    return {
        "search": search.wall_s,
        "prune": prune,
        "retrain": retrain,
        "fine_prune": [f.get("wall_s") for f in search.fine_grained],
        "reference": reference["wall_s"] if reference else None,
        "search_prune_retrain": round(sum(s for s in stages.values() if s is not None), 1),
        "missing": [name for name, s in stages.items() if s is None],
    }


def load_reference(path: Path, search: SearchRun) -> dict:
    """A plain training run at CR 1; its bytes are the search's when both embed the same data."""
    result = read_json(path / "result.json")
    config = path / "config.yaml"
    cfg = load_config([config]) if config.is_file() else None
    same = cfg is not None and (cfg.data.path, cfg.model.embedding_dim) == (
        search.cfg.data.path, search.cfg.model.embedding_dim
    )
    return {
        "source": str(path / "result.json"), "result": result, "wall_s": stage_wall_s(path, result),
        "embedding_bytes": search.unpruned_embedding_bytes if same else None,
    }


def build_report(search_dir: Path, retrain: Iterable[Path] = (), reference: Optional[Path] = None) -> dict:
    """The report of ``search_dir``, its retrain runs (found and ``retrain``) and ``reference``."""
    search = load_search(search_dir)
    retrains = [load_retrain(d, search) for d in retrain_dirs(search_dir, retrain)]
    ref = load_reference(reference, search) if reference is not None else None
    return {
        "search_run": str(search_dir),
        "search": {"test": search.result["test"], "wall_s": search.wall_s},
        "alpha": {"values": search.alpha["alpha"], "blocks": search.alpha["blocks"]},
        "widths": {
            "embedding_dim": search.cfg.model.embedding_dim,
            "num_blocks": search.blocking.num_blocks,
            "plans": {
                m.plan_source: mean_widths(m.plan, search.blocking) for m in distinct_plans(search, retrains)
            },
        },
        "cr_table": cr_table(search, retrains, ref),
        "parameters": parameter_counts(search, retrains),
        "wall_s": wall_times(search, retrains, ref),
        "plots": list(PLOTS),
    }

