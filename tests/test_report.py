"""``dnis report`` on hand-made run directories: the CR table, widths checked by hand,
parameter counts, wall-time fallbacks, and valid PNGs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import launch.cli
import launch.report
from data_fixtures import write_dataset
from pipeline.config import load_config, save_config
from pipeline.prune.plan import group_ranges
from pipeline.report import PLOTS, dense_parameters
from pipeline.search.alpha_table import alpha_rows
from pipeline.search.blocking import compute_blocking
from plans.bytes import PROJECTIONS
from plans.structured import GroupPlan, StructuredPlan

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
K = 16  # configs/tiny.yaml
# a: ids 0..5, b: ids 0..1; blocks: a [0,2) [2,6), b [0,2) and an empty block 1.
BLOCKING = compute_blocking({"a": [[10, 2], [1, 4]], "b": [[5, 2]]}, num_blocks=2)
NUM_EMBEDDINGS = {"a": 6, "b": 2}
# Kept columns per group, in group_ranges order: a [0,1) [1,2) | [2,3) [3,6); b [0,1) [1,2).
KEPT = [5, 4, 0, 1, 16, 16]  # widths (multiples of 4): 8, 4, 0, 4, 16, 16
SEARCH_TEST = {"auc": 0.7006587982177734, "logloss": 0.5088818669319153, "rows": 1000}
BEFORE = {"auc": 0.6912345, "logloss": 0.5123456, "rows": 1000}
AFTER = {"auc": 0.7212345, "logloss": 0.4923456, "rows": 1000}
FINE = [  # written unsorted by CR
    {"target_cr": 20.0, "epsilon": 0.03, "nnz": 3, "coo_bytes": 27, "unpruned_bytes": 512,
     "compression_ratio": 18.962962962962962, "wall_s": 2.0,
     "test": {"auc": 0.65, "logloss": 0.55, "rows": 1000}},
    {"target_cr": 2.5, "epsilon": 0.01, "nnz": 22, "coo_bytes": 198, "unpruned_bytes": 512,
     "compression_ratio": 2.585858585858586, "wall_s": 3.0,
     "test": {"auc": 0.70, "logloss": 0.51, "rows": 1000}},
]


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_plan() -> StructuredPlan:
    groups = group_ranges(BLOCKING, NUM_EMBEDDINGS, ranges_per_block=2)
    assert [(g.key, g.start, g.stop) for g in groups] == [
        ("a", 0, 1), ("a", 1, 2), ("a", 2, 3), ("a", 3, 6), ("b", 0, 1), ("b", 1, 2)
    ]
    return StructuredPlan(tuple(GroupPlan(g, tuple(range(n))) for g, n in zip(groups, KEPT)), K, tau=0.1)


def prune_json(plan: StructuredPlan, projection: str) -> dict:
    """What ``dnis prune`` writes."""
    return {
        "target": {"cr": 1.5, "tau": None}, "projection": projection, "ranges_per_block": 2, "tau": plan.tau,
        "compression_ratio": {p: plan.compression_ratio(p) for p in PROJECTIONS},
        "embedding_bytes": {p: plan.embedding_bytes(p) for p in PROJECTIONS},
        "unpruned_bytes": plan.unpruned_bytes(), "wall_s": 4.5, "plan": plan.to_json(),
    }


def retrain_result(plan: StructuredPlan, projection: str, wall_s: float) -> dict:
    """What ``dnis retrain`` writes."""
    return {
        "stage": "retrain", "before_retrain": BEFORE, "test": AFTER, "projection": projection,
        "compression_ratio": plan.compression_ratio(projection),
        "embedding_bytes": plan.embedding_bytes(projection),
        "unpruned_bytes": plan.unpruned_bytes(), "wall_s": wall_s,
    }


def make_search(root: Path, data_path: Path) -> Path:
    """A finished search without any prune; result.json predates ``wall_s``."""
    search = root / "search"
    search.mkdir(parents=True)
    cfg = load_config([ROOT / "configs" / "tiny.yaml"], [f"data.path={data_path}", f"run.dir={search}"])
    save_config(cfg, search / "config.yaml")
    alpha = torch.linspace(0, 1, BLOCKING.num_blocks * K).reshape(BLOCKING.num_blocks, K)
    write(search / "alpha.json", {
        "alpha": alpha.tolist(), "blocking": BLOCKING.to_json(), "blocks": alpha_rows(alpha, BLOCKING),
    })
    write(search / "blocking.json", BLOCKING.to_json())
    write(search / "result.json", {"stage": "search", "test": SEARCH_TEST})
    events = [("train", 100.0), ("val", 110.0), ("test", 130.0), ("prune", 500.0)]  # prune: a later stage
    lines = [json.dumps({"event": e, "time": t}) + "\n" for e, t in events]
    (search / "metrics.jsonl").write_text("".join(lines))
    (search / "checkpoints" / "best").mkdir(parents=True)
    return search


def assert_pngs(out: Path) -> None:
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 3_000, name
    assert not list(out.glob("*.tmp"))


def test_report_of_a_search_its_prunes_and_retrains(tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data)
    search = make_search(tmp_path, data)
    plan = make_plan()
    write(search / "prune.json", prune_json(plan, "selection"))
    write(search / "fine_prune.json", {"results": FINE})
    write(search / "retrain" / "result.json", retrain_result(plan, "selection", wall_s=12.5))  # no prune.json
    learned = tmp_path / "retrain-learned"
    write(learned / "result.json", retrain_result(plan, "learned", wall_s=20.0))
    write(learned / "prune.json", {**prune_json(plan, "selection"), "search_run": str(search)})
    reference = tmp_path / "train"
    write(reference / "result.json", {"stage": "train", "test": {"auc": 0.68, "logloss": 0.52, "rows": 1000},
                                      "wall_s": 50.0})
    save_config(load_config([search / "config.yaml"]), reference / "config.yaml")

    report = launch.report.main([
        "--run-dir", str(search), "--retrain", str(learned), "--reference", str(reference),
    ])

    out = search / "report"
    assert json.loads((out / "report.json").read_text()) == report
    assert_pngs(out)
    rows = report["cr_table"]
    selection, learned_cr = plan.compression_ratio("selection"), plan.compression_ratio("learned")
    assert learned_cr < 1 < selection < FINE[1]["compression_ratio"]  # of 512 unpruned bytes; selection 296
    assert [(r["method"], r["compression_ratio"]) for r in rows] == [
        ("structured", learned_cr), ("structured+retrain", learned_cr),
        ("reference", 1.0), ("search (α)", 1.0),
        ("structured", selection), ("structured+retrain", selection),
        ("fine-grained", FINE[1]["compression_ratio"]), ("fine-grained", FINE[0]["compression_ratio"]),
    ]
    by_source = {(r["method"], r["source"]): r for r in rows}
    retrained = by_source[("structured+retrain", "retrain/result.json")]
    assert (retrained["auc"], retrained["logloss"]) == (AFTER["auc"], AFTER["logloss"])
    assert retrained["wall_s"] == 12.5
    assert retrained["embedding_bytes"] == plan.embedding_bytes("selection") == 296
    before = by_source[("structured", "retrain/result.json")]
    assert (before["auc"], before["logloss"], before["wall_s"]) == (BEFORE["auc"], BEFORE["logloss"], 4.5)
    searched = by_source[("search (α)", "result.json")]
    assert searched["auc"] == SEARCH_TEST["auc"]
    assert (searched["wall_s"], searched["embedding_bytes"]) == (30.0, 512)  # metrics span; 8 ids × K × 4
    assert by_source[("reference", str(reference / "result.json"))]["embedding_bytes"] == 512
    fine = [r for r in rows if r["method"] == "fine-grained"]
    assert [(r["embedding_bytes"], r["auc"], r["wall_s"]) for r in fine] == [
        (198, 0.70, 3.0), (27, 0.65, 2.0)
    ]

    # One plan (the search's; the retrains ship it), widths averaged over ids by hand.
    assert report["widths"]["plans"] == {
        "prune.json": {"a": [(8 * 1 + 4 * 1) / 2, (0 * 1 + 4 * 3) / 4], "b": [16.0, None]}
    }
    params = report["parameters"]
    assert params["embedding_unpruned"] == 8 * K
    values = 8 + 4 + 0 + 4 * 3 + 16 + 16
    assert [(p["source"], p["values"], p["projection_params"]) for p in params["embedding_pruned"]] == [
        ("prune.json (selection)", values, 0),
        (f"{learned}/prune.json (learned)", values, (8 + 4 + 0 + 4 + 16 + 16) * K),
        ("fine_prune.json", 3, 0), ("fine_prune.json", 22, 0),
    ]
    # tiny DeepFM over 39 fields of K: first order (39K + 1), MLP [16] (39K·16 + 16), output (16 + 1)
    assert params["dense"] == (39 * K + 1) + (39 * K * 16 + 16) + (16 + 1)
    wall = report["wall_s"]
    assert wall["prune"] == {"prune.json": 4.5}
    assert wall["retrain"] == {"retrain": 12.5, str(learned): 20.0}
    assert wall["search_prune_retrain"] == 30.0 + 4.5 + 12.5 + 20.0 and wall["missing"] == []
    printed = capsys.readouterr().out
    assert "structured+retrain" in printed and "0.72123" in printed


def test_report_of_a_bare_search_through_the_cli(tmp_path, monkeypatch, capsys):
    search = make_search(tmp_path, tmp_path / "no-such-dataset")
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text("{}")  # a stale report is replaced
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    launch.cli.main(["report", "--run-dir", str(search), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["cr_table"]] == ["search (α)"]
    assert report["widths"]["plans"] == {} and report["parameters"]["dense"] is None
    assert report["parameters"]["embedding_pruned"] == []
    assert report["wall_s"]["search_prune_retrain"] == 30.0
    assert_pngs(out)
    assert "search (α)" in capsys.readouterr().out


def test_missing_inputs_are_named(tmp_path):
    search = make_search(tmp_path, tmp_path / "no-such-dataset")
    (search / "alpha.json").unlink()
    with pytest.raises(SystemExit, match="alpha.json: missing"):
        launch.report.main(["--run-dir", str(search)])
    assert dense_parameters(load_config([search / "config.yaml"])) is None
