"""Reading a compare's run directories into one row per (method, budget, seed), picking
candidates by validation loss, and aggregating seeds into mean ± std.

A row: ``data, model, method, target_cr, seed, bytes, cr, auc, logloss, val_loss,
wall_s`` (``wall_s``: every stage the method needed, shared ones counted in full), and
``choice`` for methods that pick among candidates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.compare.protocol import FIXED_CR, SHARED_METHODS, Cell, cr_tag


def _json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def best_val_loss(run_dir: Path) -> float:
    """Lowest validation logloss a run logged (what early stopping kept)."""
    losses = [
        e["logloss"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if e.get("event") == "val"
    ]
    return min(losses) if losses else float("nan")


def pick_by_validation(candidates: list[dict]) -> Optional[dict]:
    """The candidate with the lowest ``val_loss`` (never looks at test metrics).

    >>> pick_by_validation([{"val_loss": 0.5, "auc": 0.9}, {"val_loss": 0.4, "auc": 0.1}])["auc"]
    0.1
    """
    scored = [c for c in candidates if not np.isnan(c["val_loss"])]
    return min(scored, key=lambda c: c["val_loss"]) if scored else None


def _run_row(run_dir: Path, nbytes: Optional[int] = None) -> Optional[dict]:
    result = _json(run_dir / "result.json")
    if result is None:
        return None
    return {
        "bytes": nbytes if nbytes is not None else result.get("embedding_bytes"),
        "auc": result["test"]["auc"], "logloss": result["test"]["logloss"],
        "val_loss": best_val_loss(run_dir), "wall_s": result["wall_s"],
    }


def _wall(*run_dirs: Path) -> float:
    walls = [(_json(d / "result.json") or {}).get("wall_s", 0.0) for d in run_dirs]
    return float(sum(walls))


def method_row(cell: Cell, method: str, cr: float, unpruned: int, dim: int) -> Optional[dict]:
    """The shipped model of ``method`` at ``cr`` in ``cell``, or ``None`` if not run."""
    tag = cr_tag(cr)
    if method == "full":
        row = _run_row(cell.dir("full"), unpruned)
    elif method == "grid":
        runs = [(k, _run_row(cell.dir("grid", f"k{k}"), unpruned * k // dim)) for k in cell.grid_widths(dim)]
        fitting = [dict(r, choice=f"K'={k}") for k, r in runs if r and r["bytes"] <= unpruned / cr]
        row = pick_by_validation(fitting)
        if row:
            row["wall_s"] = sum(r["wall_s"] for _, r in runs if r)
    elif method == "random":
        dirs = [cell.dir("random", tag, f"c{i}", "run") for i in range(cell.settings.candidates)]
        rows = [dict(r, choice=f"c{i}") for i, r in enumerate(map(_run_row, dirs)) if r]
        row = pick_by_validation(rows)
        if row:
            row["wall_s"] = _wall(*dirs)
    elif method in ("mde", "nis_me"):
        row = _run_row(cell.dir(method, tag, "run"))
        if row and method == "nis_me":
            row["wall_s"] += _wall(cell.dir(method, tag, "search"))
    elif method in SHARED_METHODS:
        dirs = {c: cell.dir(method, tag, f"min{c:g}") for c in cell.settings.min_row_lookups}
        rows = [dict(r, choice=f"min {c:g}", c=c) for c, r in ((c, _run_row(d)) for c, d in dirs.items()) if r]
        row = pick_by_validation(rows)
        if row and "_int8" in method:  # chosen on fp32 validation, shipped as INT8
            quantized = _quantized_row(dirs[row["c"]], 8)
            row = None if quantized is None else dict(quantized, choice=row["choice"], val_loss=row["val_loss"])
        if row:
            row.pop("c", None)
            row["wall_s"] = _wall(*dirs.values(), cell.dir("search"))
    elif method in ("dnis", "dnis_value", "dnis_ladder", "magnitude"):
        row = _run_row(cell.dir(method, tag))
        if row:
            row["wall_s"] += _wall(cell.dir("warm" if method == "magnitude" else "search"))
    elif method in ("dnis_fine", "magnitude_fine"):
        row = _fine_row(cell.dir("search" if method == "dnis_fine" else "warm"), cr)
    elif method == "qr":
        row = _run_row(cell.dir("qr", tag))
    elif method in ("int8", "int4", "dnis_int8"):
        run_dir = cell.dir("dnis", tag) if method == "dnis_int8" else cell.dir("full")
        row = _quantized_row(run_dir, 4 if method == "int4" else 8)
    else:
        raise ValueError(f"unknown method {method!r}")
    if row is None:
        return None
    target = FIXED_CR.get(method, cr)
    return {"data": cell.data, "model": cell.model, "method": method, "target_cr": target,
            "seed": cell.seed, "cr": unpruned / row["bytes"], **row}


def _fine_row(source: Path, cr: float) -> Optional[dict]:
    doc = _json(source / "fine_prune.json") or {"results": []}
    entry = next((e for e in doc["results"] if e["target_cr"] == cr), None)
    if entry is None:
        return None
    return {"bytes": entry["coo_bytes"], "auc": entry["test"]["auc"], "logloss": entry["test"]["logloss"],
            "val_loss": float("nan"), "wall_s": entry["wall_s"] + _wall(source)}


def _quantized_row(run_dir: Path, bits: int) -> Optional[dict]:
    doc = _json(run_dir / f"quantized_int{bits}.json")
    if doc is None:
        return None
    return {"bytes": doc["embedding_bytes"], "auc": doc["test"]["auc"], "logloss": doc["test"]["logloss"],
            "val_loss": float("nan"), "wall_s": doc["wall_s"] + _wall(run_dir)}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean ± std (over seeds) per (data, model, method, target_cr), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"], r["method"], r["target_cr"]), []).append(r)
    out = []
    for (data, model, method, target), rs in groups.items():
        summary = {"data": data, "model": model, "method": method, "target_cr": target, "seeds": len(rs)}
        for key in ("cr", "bytes", "auc", "logloss", "wall_s"):
            values = np.array([r[key] for r in rs], dtype=np.float64)
            summary[key] = float(values.mean())
            summary[f"{key}_std"] = float(values.std(ddof=1)) if len(rs) > 1 else 0.0
        out.append(summary)
    return out
