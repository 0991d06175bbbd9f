"""Writing a report directory (``write_report``) and its console summary (``format_summary``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pipeline.report.plots import PLOTTERS
from pipeline.run_dir import write_json_atomic

REPORT_FILE = "report.json"


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
    header = ("method", "source", "target CR", "CR", "emb MB", "test AUC", "logloss", "wall s")
    lines = [
        [r["method"], r["source"], _fmt(r.get("target_cr"), 1, "g"), f"{r['compression_ratio']:.2f}",
         _fmt(r["embedding_bytes"], 1e-6, ".2f"),
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
