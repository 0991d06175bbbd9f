"""``compare.md`` (tables and who wins each budget) and the Pareto plot of a compare."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import NullFormatter  # noqa: E402


def _cells(summary: list[dict]) -> dict[tuple[str, str], list[dict]]:
    cells: dict[tuple[str, str], list[dict]] = {}
    for s in summary:
        cells.setdefault((s["data"], s["model"]), []).append(s)
    return cells


def winners(rows: list[dict]) -> list[str]:
    """Per target CR: the best mean test AUC among methods that met the budget, and its
    margin over the runner-up in units of the larger seed std."""
    lines = []
    targets = sorted({r["target_cr"] for r in rows if r["target_cr"] not in (None, 1.0)})
    for target in targets:
        ranked = sorted((r for r in rows if r["target_cr"] == target), key=lambda r: -r["auc"])
        if len(ranked) < 2:
            continue
        best, second = ranked[:2]
        spread = max(best["auc_std"], second["auc_std"])
        margin = best["auc"] - second["auc"]
        if min(best["seeds"], second["seeds"]) < 2:
            noise = "one seed: no spread to compare with"
        else:
            verdict = "beyond" if margin > 2 * spread else "within"
            noise = f"{margin / max(spread, 1e-12):.1f} × the larger seed std: {verdict} 2 std"
        lines.append(
            f"- CR {target:g}: **{best['method']}** {best['auc']:.4f} ahead of {second['method']} "
            f"{second['auc']:.4f} by {margin:.4f} ({noise})"
        )
    return lines


def markdown(summary: list[dict], failures: Sequence[str] = (), unfinished: int = 0) -> str:
    """One table per (dataset, model), the winner of each budget, and the runs that failed;
    ``unfinished`` runs not run yet make it a partial compare, said first."""
    out = ["# dnis compare", ""]
    if unfinished:
        out += [f"**Partial: {unfinished} run(s) of this compare have not run yet** (`--tables-only`).", ""]
    for (data, model), rows in _cells(summary).items():
        out += [f"## {data} / {model}", "",
                "| method | target CR | CR | embedding bytes | test AUC | test logloss | wall s | seeds |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            target = "-" if r["target_cr"] is None else f"{r['target_cr']:g}"
            out.append(
                f"| {r['method']} | {target} | {r['cr']:.2f} | {r['bytes']:,.0f} | "
                f"{r['auc']:.4f} ± {r['auc_std']:.4f} | {r['logloss']:.4f} ± {r['logloss_std']:.4f} | "
                f"{r['wall_s']:.0f} | {r['seeds']} |"
            )
        out += ["", *winners(rows), ""]
    if failures:
        out += ["## Failed runs (rerun the compare to retry)", "", *[f"- {f}" for f in failures], ""]
    return "\n".join(out)


def pareto_plot(summary: list[dict], path: Path) -> None:
    """Test AUC and logloss against shipped embedding bytes (log x), one marker per
    method, error bars of the seed std; one row of panels per (dataset, model)."""
    cells = _cells(summary)
    fig, axes = plt.subplots(len(cells), 2, figsize=(12, 4.5 * len(cells)), squeeze=False)
    markers = "osD^v<>phX*P8"
    for (cell, rows), (ax_auc, ax_loss) in zip(cells.items(), axes):
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for i, method in enumerate(methods):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes"])
            x = [r["bytes"] for r in mine]
            for ax, key in ((ax_auc, "auc"), (ax_loss, "logloss")):
                ax.errorbar(x, [r[key] for r in mine], yerr=[r[f"{key}_std"] for r in mine],
                            marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20),
                            capsize=3, label=method)
        for ax, label in ((ax_auc, "test AUC"), (ax_loss, "test logloss")):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
            ax.set_xlabel("shipped embedding bytes")
            ax.set_ylabel(label)
            ax.set_title(" / ".join(cell))
            ax.grid(True, alpha=0.3)
        ax_auc.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
