"""The report of a DNIS search and of what was pruned and retrained from it.

    python -m launch.report --run-dir runs/synthetic/search --reference runs/synthetic/train

``build_report`` reads the run directories into one JSON-ready dict; ``write_report``
draws the plots from that dict alone (matplotlib's Agg canvas, no display) and writes
``report.json`` last, so a report directory holding ``report.json`` is complete.

Inputs: a finished search (``config.yaml``, ``alpha.json``, ``blocking.json``,
``result.json``, ``metrics.jsonl``, and when present ``prune.json`` and
``fine_prune.json``), its retrain runs (``result.json``, their ``prune.json``) and
optionally a plain training run as the CR-1 reference.

Outputs:
- ``report.json``: search test metrics; α and its per-block summary; the rows-weighted
  mean kept width per (feature, block) of every structured plan; ``cr_table`` (one row
  per model: method, source, CR, embedding bytes, test AUC/logloss, the wall time of the
  stage that made it), sorted by CR; parameter counts; wall times per stage.
- ``alpha.png`` (α per block and dimension), ``dims.png`` (kept width per feature and
  block), ``cr_auc.png`` (test AUC and logloss against CR, log x), ``params.png``
  (embedding parameters unpruned and pruned; dense MLP parameters apart).

CR and bytes count embeddings only (``pipeline.prune.bytes``); dense parameters are never
mixed in. A stage's wall time is ``wall_s`` from its result (or prune entry); runs written
before that field existed get the span of their own metrics events, which misses the
start-up before the first event.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from pipeline.config import Config, load_config
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import DatasetMeta
from pipeline.prune.bytes import VALUE_BYTES, unpruned_bytes
from pipeline.prune.plan import StructuredPlan
from pipeline.run_dir import write_json_atomic
from pipeline.search.blocking import Blocking
from pipeline.tasks import build_train_task

METRIC_NAMES = {"auc": "AUC", "logloss": "logloss"}
METHODS = ("reference", "search (α)", "structured", "structured+retrain", "fine-grained")
STAGE_EVENTS = ("train", "val", "test", "resume")  # what a stage logs about itself
REPORT_FILE = "report.json"
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


# ---------------------------------------------------------------- plots


def plot_alpha(report: dict) -> Figure:
    """α heat map: one row per block (0 = most frequent), one column per dimension."""
    alpha = np.asarray(report["alpha"]["values"])
    labels = [f"{b['block']} ({b['features']:,} ids)" for b in report["alpha"]["blocks"]]
    fig = Figure(figsize=(max(6.0, 0.22 * alpha.shape[1] + 3), 1.5 + 0.3 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(alpha, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1.0, float(alpha.max())))
    _label_ticks(ax.set_yticks, labels)
    ax.set_xlabel("embedding dimension")
    ax.set_ylabel("block (0 = most frequent)")
    ax.set_title(f"α after the search (test AUC {report['search']['test']['auc']:.4f})")
    fig.colorbar(image, ax=ax, label="α")
    return fig


def plot_dims(report: dict) -> Figure:
    """Kept width per feature (rows) and block (columns), one panel per structured plan."""
    widths = report["widths"]
    plans = widths["plans"]
    keys = list(next(iter(plans.values()))) if plans else []
    fig = Figure(figsize=(0.7 * widths["num_blocks"] * max(len(plans), 1) + 3, 1.8 + 0.2 * len(keys)),
                 layout="constrained")
    if not plans:
        return _empty(fig, "no structured prune in this search (run `dnis prune`)")
    axes = fig.subplots(1, len(plans), squeeze=False)[0]
    for ax, (source, table) in zip(axes, plans.items()):
        values = np.array([[np.nan if w is None else w for w in table[k]] for k in keys])
        image = ax.imshow(values, aspect="auto", cmap="YlGnBu", vmin=0, vmax=widths["embedding_dim"])
        _annotate(ax, values, widths["embedding_dim"])
        _label_ticks(ax.set_yticks, keys, fontsize=7)
        ax.set_xticks(range(widths["num_blocks"]))
        ax.set_xlabel("block (0 = most frequent)")
        ax.set_title(f"kept width, {source}", fontsize=9)
    axes[0].set_ylabel("feature")
    label = f"mean kept width (of K={widths['embedding_dim']}, rows-weighted)"
    fig.colorbar(image, ax=list(axes), label=label)
    return fig


def plot_cr_auc(report: dict) -> Figure:
    """Test AUC and logloss against CR (log x), one series per method."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    panels = fig.subplots(1, 2)
    markers = dict(zip(METHODS, "s*o^D"))
    for ax, (metric, name) in zip(panels, METRIC_NAMES.items()):
        for method in METHODS:
            points = [(r["compression_ratio"], r[metric]) for r in report["cr_table"]
                      if r["method"] == method and r[metric] is not None]
            if points:
                ax.plot(*zip(*points), marker=markers[method], markersize=8, label=method)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("compression ratio (embedding bytes, log scale)")
        ax.set_ylabel(f"test {name}")
        ax.set_title(f"test {name} vs compression ratio")
        ax.grid(True, which="both", alpha=0.3)
    panels[0].legend(fontsize=8)
    return fig


def plot_params(report: dict) -> Figure:
    """Embedding parameters unpruned and of each pruned model; dense parameters apart."""
    counts = report["parameters"]
    pruned = counts["embedding_pruned"]
    labels = ["unpruned"] + [f"{p['method']}\n{p['source']}\nCR {p['compression_ratio']:.1f}" for p in pruned]
    values = [counts["embedding_unpruned"]] + [p["values"] for p in pruned]
    projections = [0] + [p["projection_params"] for p in pruned]
    fig = Figure(figsize=(max(7.0, 1.6 * len(labels) + 3), 4.5), layout="constrained")
    embedding_ax, dense_ax = fig.subplots(1, 2, width_ratios=[max(len(labels), 2), 1.2])
    positions = np.arange(len(labels))
    embedding_ax.bar(positions, values, label="table values")
    if any(projections):
        embedding_ax.bar(positions, projections, bottom=values, label="learned projections")
        embedding_ax.legend(fontsize=8)
    _bar_labels(embedding_ax, positions, np.add(values, projections))
    embedding_ax.set_xticks(positions, labels, fontsize=8)
    embedding_ax.set_ylabel("parameters")
    embedding_ax.set_title("embedding parameters")
    dense = counts["dense"]
    dense_ax.set_title("dense (MLP)")
    dense_ax.set_xticks([0], ["every model"], fontsize=8)
    if dense is None:
        dense_ax.text(0.5, 0.5, "dataset not found", ha="center", transform=dense_ax.transAxes)
    else:
        dense_ax.bar([0], [dense], color="tab:gray")
        _bar_labels(dense_ax, [0], [dense])
    for ax in (embedding_ax, dense_ax):
        ax.yaxis.set_major_formatter(FuncFormatter(lambda n, _: _short_count(n)))
        ax.margins(y=0.1)
    return fig


def _label_ticks(set_ticks: Callable, labels: list[str], fontsize: float = 8, most: int = 60) -> None:
    """Tick labels, every n-th one when there are more than ``most``."""
    step = math.ceil(len(labels) / most)
    set_ticks(range(0, len(labels), step), labels[::step], fontsize=fontsize)


def _annotate(ax, values: np.ndarray, vmax: float) -> None:
    """Each cell's value (one decimal unless whole), dark or light against its colour."""
    for (row, col), value in np.ndenumerate(values):
        if np.isnan(value):
            ax.text(col, row, "–", ha="center", va="center", fontsize=6, color="gray")
            continue
        text = f"{value:.0f}" if value == round(value) else f"{value:.1f}"
        color = "white" if value > 0.6 * vmax else "black"
        ax.text(col, row, text, ha="center", va="center", fontsize=6, color=color)


def _bar_labels(ax, positions, heights) -> None:
    for x, h in zip(positions, heights):
        ax.text(x, h, _short_count(h), ha="center", va="bottom", fontsize=8)


def _short_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _empty(fig: Figure, message: str) -> Figure:
    fig.text(0.5, 0.5, message, ha="center", va="center")
    return fig


PLOTTERS = dict(zip(PLOTS, (plot_alpha, plot_dims, plot_cr_auc, plot_params)))


# ---------------------------------------------------------------- writing


def write_report(report: dict, out: Path) -> None:
    """The plots, then ``report.json``; each file appears whole (temporary file + rename).

    An older ``report.json`` is removed first, so the directory never looks complete
    while the new plots are being drawn.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).unlink(missing_ok=True)
    for name, plot in PLOTTERS.items():
        path = out / name
        tmp = path.with_name(path.name + ".tmp")
        plot(report).savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    write_json_atomic(out / REPORT_FILE, report)


def format_summary(report: dict) -> str:
    """The CR table as aligned columns, then parameter counts and wall times."""
    header = ("method", "source", "CR", "emb MB", "test AUC", "logloss", "wall s")
    lines = [
        [r["method"], r["source"], f"{r['compression_ratio']:.2f}", _fmt(r["embedding_bytes"], 1e-6, ".2f"),
         _fmt(r["auc"], 1, ".5f"), _fmt(r["logloss"], 1, ".5f"), _fmt(r["wall_s"], 1, ".1f")]
        for r in report["cr_table"]
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    table = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *lines]
    ]
    params, wall = report["parameters"], report["wall_s"]
    dense = "unknown (no dataset)" if params["dense"] is None else f"{params['dense']:,}"
    missing = f" (no time recorded: {', '.join(wall['missing'])})" if wall["missing"] else ""
    return "\n".join([
        *table,
        f"embedding parameters unpruned {params['embedding_unpruned']:,}; dense (MLP) parameters {dense}",
        f"wall time search + prune + retrain: {wall['search_prune_retrain']:.1f} s{missing}",
    ])


def _fmt(value: Optional[float], scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)
