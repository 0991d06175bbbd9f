"""The report's figures, drawn from the report dict alone on matplotlib's Agg canvas
(no display): ``PLOTTERS`` maps each file name in ``PLOTS`` to its figure."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from pipeline.report.summary import METHODS, PLOTS

METRIC_NAMES = {"auc": "AUC", "logloss": "logloss"}


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
