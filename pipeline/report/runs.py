"""Reading a search's run directories (and its retrain and reference runs) into the
JSON-ready report dict: ``build_report``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from pipeline.config import Config, load_config
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import DatasetMeta
from pipeline.prune.bytes import VALUE_BYTES, unpruned_bytes
from pipeline.prune.plan import StructuredPlan
from pipeline.search.blocking import Blocking
from pipeline.tasks import build_train_task

METHODS = ("reference", "search (α)", "structured", "structured+retrain", "fine-grained")
STAGE_EVENTS = ("train", "val", "test", "resume")  # what a stage logs about itself
PLOTS = ("alpha.png", "dims.png", "cr_auc.png", "params.png")


class ReportError(ValueError):
    """An input run directory is missing a file or holds an unreadable one."""


# ---------------------------------------------------------------- reading runs


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; a missing or malformed file names itself."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None


def read_optional_json(path: Path) -> Optional[Any]:
    return read_json(path) if path.is_file() else None


def metrics_span_s(run_dir: Path) -> Optional[float]:
    """Seconds between the first and last event the run logged about itself."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [event["time"] for event in events if event.get("event") in STAGE_EVENTS]
    return round(times[-1] - times[0], 1) if times else None


def stage_wall_s(run_dir: Path, result: dict) -> Optional[float]:
    """The stage's recorded ``wall_s``, else the span of its metrics events."""
    return result["wall_s"] if "wall_s" in result else metrics_span_s(run_dir)


def relative_label(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class StructuredModel:
    """A structurally pruned model: its plan (found in ``plan_source``), the projection it
    ships with, its serving bytes, and the wall time of the prune that made the plan."""

    plan_source: str
    plan: StructuredPlan
    projection: str
    compression_ratio: float
    embedding_bytes: int
    prune_wall_s: Optional[float]

    @classmethod
    def from_prune_json(cls, plan_source: str, doc: dict) -> "StructuredModel":
        projection = doc["projection"]
        return cls(
            plan_source, StructuredPlan.from_json(doc["plan"]), projection,
            doc["compression_ratio"][projection], doc["embedding_bytes"][projection], doc.get("wall_s"),
        )

    def as_retrained(self, result: dict) -> "StructuredModel":
        """The same plan as a retrain run shipped it (``result``: maybe another projection)."""
        return dataclasses.replace(
            self, projection=result["projection"], compression_ratio=result["compression_ratio"],
            embedding_bytes=result["embedding_bytes"],
        )


@dataclass(frozen=True)
class RetrainRun:
    """A retrain run: the model it shipped (None when its plan is unknown) and results."""

    source: str
    model: Optional[StructuredModel]
    result: dict
    wall_s: Optional[float]


@dataclass(frozen=True)
class SearchRun:
    """A finished search with its optional structured and fine-grained prunes."""

    path: Path
    cfg: Config
    alpha: dict
    blocking: Blocking
    result: dict
    wall_s: Optional[float]
    pruned: Optional[StructuredModel]
    fine_grained: list[dict]

    @property
    def unpruned_embedding_bytes(self) -> int:
        return unpruned_bytes(sum(self.blocking.block_features), self.cfg.model.embedding_dim)


def load_search(path: Path) -> SearchRun:
    if not (path / "config.yaml").is_file():
        raise ReportError(f"{path}: no config.yaml; is it a search run directory?")
    result = read_json(path / "result.json")
    prune = read_optional_json(path / "prune.json")
    fine = read_optional_json(path / "fine_prune.json")
    return SearchRun(
        path=path,
        cfg=load_config([path / "config.yaml"]),
        alpha=read_json(path / "alpha.json"),
        blocking=Blocking.from_json(read_json(path / "blocking.json")),
        result=result,
        wall_s=stage_wall_s(path, result),
        pruned=StructuredModel.from_prune_json("prune.json", prune) if prune else None,
        fine_grained=fine["results"] if fine else [],
    )


def retrain_dirs(search: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """Every direct subdirectory of ``search`` holding a retrain result, then ``extra``."""
    found = [
        d for d in sorted(search.iterdir())
        if (d / "result.json").is_file() and read_json(d / "result.json").get("stage") == "retrain"
    ]
    known = {d.resolve() for d in found}
    return found + [d for d in extra if d.resolve() not in known]


def load_retrain(path: Path, search: SearchRun) -> RetrainRun:
    """A retrain run; its plan is its own ``prune.json``, or (older runs) the search's
    when the bytes it reports are that plan's."""
    source = relative_label(path, search.path)
    result = read_json(path / "result.json")
    if result.get("stage") != "retrain":
        raise ReportError(f"{path / 'result.json'}: stage {result.get('stage')!r}, expected 'retrain'")
    prune = read_optional_json(path / "prune.json")
    model = None
    if prune is not None:
        model = StructuredModel.from_prune_json(f"{source}/prune.json", prune)
    elif search.pruned is not None and _same_bytes(search.pruned, result):
        model = search.pruned
    shipped = model.as_retrained(result) if model else None
    return RetrainRun(source, shipped, result, stage_wall_s(path, result))


def _same_bytes(pruned: StructuredModel, result: dict) -> bool:
    """Whether ``result``'s embedding bytes are ``pruned``'s plan under its projection."""
    return pruned.plan.embedding_bytes(result["projection"]) == result["embedding_bytes"]


# ---------------------------------------------------------------- the summary


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
    test: Optional[dict], wall_s: Optional[float],
) -> dict:
    test = test or {}
    return {
        "method": method, "source": source, "compression_ratio": cr, "embedding_bytes": embedding_bytes,
        "auc": test.get("auc"), "logloss": test.get("logloss"), "wall_s": wall_s,
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
        prune_wall = r.model.prune_wall_s if r.model else None
        source = f"{r.source}/result.json"
        rows.append(cr_row("structured", source, cr, size, r.result.get("before_retrain"), prune_wall))
        rows.append(cr_row("structured+retrain", source, cr, size, r.result["test"], r.wall_s))
    if search.pruned and not any(r.model and r.model.plan == search.pruned.plan for r in retrains):
        p = search.pruned
        rows.append(cr_row(
            "structured", p.plan_source, p.compression_ratio, p.embedding_bytes, None, p.prune_wall_s
        ))
    for f in search.fine_grained:
        rows.append(cr_row("fine-grained", "fine_prune.json", f["compression_ratio"], f["coo_bytes"],
                           f["test"], f.get("wall_s")))
    return sorted(rows, key=lambda row: (row["compression_ratio"], METHODS.index(row["method"])))


def dense_parameters(cfg: Config) -> Optional[int]:
    """Parameters of the configured model outside its embeddings (None: no dataset)."""
    if not (Path(cfg.data.path) / "metadata.json").is_file():
        return None
    layout = FeatureLayout.from_meta(DatasetMeta.load(cfg.data.path), cfg.data.dense_mode)
    task = build_train_task(cfg, layout, torch.device("meta"))
    return sum(p.numel() for name, p in task.named_parameters() if "embedding" not in name)


def structured_parameters(model: StructuredModel) -> dict:
    """Stored values (rows × width) and learned projection matrices (width × K)."""
    values = sum(g.group.rows * g.width for g in model.plan.groups)
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

