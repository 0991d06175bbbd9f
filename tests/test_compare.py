"""``dnis compare``: the baselines' plans stay within their byte budgets, choices between
candidates read validation losses only, magnitude pruning at τ=0 is the unpruned model,
and a killed compare continues without redoing finished runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from launch.retrain import repacked_state
from launch_helpers import ROOT, TINY, kill_tree
from pipeline.compare.plans import mde_plan, random_plan, width_plan
from pipeline.compare.protocol import Cell, Settings
from pipeline.compare.results import method_row
from pipeline.config import ModelConfig
from pipeline.data.batch import Batch
from pipeline.models import build_model
from pipeline.prune.plan import group_mass, group_ranges, plan_for_tau
from pipeline.search.blocking import compute_blocking
from pipeline.tasks import TrainTask
from sharding.dmp import narrow_table_constraints
from sharding.field_embedding import FieldEmbeddingCollection, table_configs
from sharding.kjt import single_hot_kjt
from sharding.repack import KeyRewriter, RepackedEmbedding
from sharding.table_stats import group_sum_sq

K = 16
NUMS = {"a": 400, "b": 60, "c": 9}
COUNTS = {k: [[1000 // (i + 1) + 1, 1] for i in range(n)] for k, n in NUMS.items()}


def groups():
    return group_ranges(compute_blocking(COUNTS, 4), NUMS)


def unpruned() -> int:
    return sum(NUMS.values()) * K * 4


def test_group_mass_sums_the_counts_of_each_groups_ids():
    gs = groups()
    mass = group_mass(gs, COUNTS)
    for g, m in zip(gs, mass):
        assert m == sum(COUNTS[g.key][i][0] for i in range(g.start, g.stop))


def test_mde_plans_fit_their_budget_and_give_popular_groups_more_columns():
    gs = groups()
    popularity = group_mass(gs, COUNTS) / np.array([g.rows for g in gs])
    for cr in (2, 5, 10, 20):
        plan = mde_plan(gs, COUNTS, K, unpruned() / cr, temperature=0.3)
        spent = plan.embedding_bytes("learned")
        assert unpruned() / cr * 0.5 <= spent <= unpruned() / cr, cr
        widths = np.array([g.width for g in plan.groups])
        order = np.argsort(-popularity)
        assert (np.diff(widths[order]) <= 0).all(), (cr, widths[order])


def test_random_plans_descend_per_block_and_fill_the_budget():
    gs = groups()
    seen = set()
    for seed in range(5):
        plan = random_plan(gs, K, unpruned() / 6, np.random.default_rng(seed))
        assert 0.8 * unpruned() / 6 <= plan.embedding_bytes("selection") <= unpruned() / 6
        per_block = {}
        for g in plan.groups:
            assert per_block.setdefault(g.group.block, g.width) == g.width  # one width per block
        widths = [per_block[b] for b in sorted(per_block)]
        assert widths == sorted(widths, reverse=True)
        seen.add(tuple(widths))
    assert len(seen) > 1


def test_narrow_plan_tables_are_data_parallel():
    gs = groups()
    plan = width_plan(gs, [1, 2, 3, 4, 8] * len(gs), K)
    module = RepackedEmbedding(plan, list(NUMS), "learned", device=torch.device("meta"))
    narrow = {c.name for c in module.ebc.embedding_bag_configs() if c.embedding_dim % 4}
    assert narrow and set(narrow_table_constraints(module)) == narrow
    assert all(c.sharding_types == ["data_parallel"] for c in narrow_table_constraints(module).values())


def _fake_run(run_dir: Path, val_losses: list[float], auc: float, nbytes: int = None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"event": "val", "logloss": v}) + "\n" for v in val_losses))
    result = {"test": {"auc": auc, "logloss": 0.5}, "wall_s": 1.0}
    if nbytes is not None:
        result["embedding_bytes"] = nbytes
    (run_dir / "result.json").write_text(json.dumps(result))


def test_grid_random_and_shared_rows_pick_by_validation_loss_only(tmp_path):
    settings = Settings(configs=(TINY,), data={"d": ""}, models=("deepfm",), methods=("grid", "random"),
                        crs=(4.0,), seeds=1, out=str(tmp_path), grid=(1, 2, 4, 8), candidates=3,
                        min_row_lookups=(0, 10, 30, 100))
    cell = Cell(settings, "d", "deepfm", 0)
    # K'=8 has the best validation and test scores but is over the CR 4 budget (CR 2).
    for k, val, auc in ((1, [0.60, 0.55], 0.70), (2, [0.52, 0.50], 0.60), (4, [0.51], 0.90), (8, [0.40], 0.99)):
        _fake_run(cell.dir("grid", f"k{k}"), val, auc)
    row = method_row(cell, "grid", 4.0, unpruned=1600, dim=8)
    assert row["choice"] == "K'=2" and row["auc"] == 0.60 and row["bytes"] == 400 and row["wall_s"] == 4.0
    for i, (val, auc) in enumerate(((0.5, 0.9), (0.3, 0.6), (0.4, 0.8))):
        _fake_run(cell.dir("random", "cr4", f"c{i}", "run"), [val], auc, nbytes=390)
    row = method_row(cell, "random", 4.0, unpruned=1600, dim=8)
    assert row["choice"] == "c1" and row["auc"] == 0.6 and row["cr"] == 1600 / 390
    # dnis_shared: one retrain per min_row_lookups candidate, the search's wall counted once.
    _fake_run(cell.dir("search"), [0.6], 0.5)
    for c, val, auc in ((0, 0.45, 0.7), (10, 0.41, 0.6), (30, 0.43, 0.9)):
        _fake_run(cell.dir("dnis_shared", "cr4", f"min{c}"), [val], auc, nbytes=400)
    row = method_row(cell, "dnis_shared", 4.0, unpruned=1600, dim=8)
    assert row["choice"] == "min 10" and row["auc"] == 0.6 and row["wall_s"] == 4.0
    # dnis_shared_int8: the same pick on fp32 validation, the pick's INT8 evaluation shipped.
    for c, val, auc in ((0, 0.45, 0.7), (10, 0.41, 0.6), (30, 0.43, 0.9)):
        run = cell.dir("dnis_shared_int8", "cr4", f"min{c}")
        _fake_run(run, [val], auc, nbytes=1000)
        quantized = {"embedding_bytes": 380 + c, "test": {"auc": auc - 0.01, "logloss": 0.5}, "wall_s": 1.0}
        (run / "quantized_int8.json").write_text(json.dumps(quantized))
    row = method_row(cell, "dnis_shared_int8", 4.0, unpruned=1600, dim=8)
    assert row["choice"] == "min 10" and row["auc"] == pytest.approx(0.59) and row["bytes"] == 390
    assert row["cr"] == 1600 / 390 and row["val_loss"] == 0.41


def test_magnitude_prune_at_tau_zero_is_the_unpruned_model():
    torch.manual_seed(0)
    cfg = ModelConfig(name="deepfm", embedding_dim=K, mlp_dims=(8,))
    ebc = EmbeddingBagCollection(table_configs(NUMS, K, 0.3))
    train = TrainTask(build_model(cfg, FieldEmbeddingCollection(ebc, list(NUMS)), len(NUMS), 0))
    gs = group_ranges(compute_blocking(COUNTS, 4), NUMS, ranges_per_block=2)
    plan = plan_for_tau(gs, group_sum_sq(train, gs, K), torch.ones(4, K), group_mass(gs, COUNTS), tau=0.0)
    assert all(len(g.columns) == K for g in plan.groups)
    retrain = TrainTask(build_model(cfg, RepackedEmbedding(plan, list(NUMS)), len(NUMS), 0))
    retrain.load_state_dict(repacked_state(train, plan, list(NUMS)), strict=False)
    ids = torch.stack([torch.randint(0, n, (64,)) for n in NUMS.values()])
    batch = Batch(torch.zeros(64, 0), single_hot_kjt(list(NUMS), ids), torch.zeros(64))
    rewritten = Batch(batch.dense, KeyRewriter(plan, list(NUMS))(batch.sparse), batch.labels)
    assert torch.allclose(train(batch)[1]["logits"], retrain(rewritten)[1]["logits"], atol=1e-6)


def test_compare_continues_after_a_kill_without_redoing_finished_runs(dataset, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "compare"
    command = [
        sys.executable, "-m", "launch.compare", "--config", TINY, "--data", f"tiny={dataset}",
        "--methods", "full,grid", "--grid", "4,8", "--cr", "4", "--seeds", "1", "--nproc", "1",
        "--smoke", "--out", str(out),
    ]
    first = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full = out / "tiny" / "deepfm" / "seed0" / "full" / "result.json"
    deadline = time.time() + 240
    while not full.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    kill_tree(first.pid)
    first.wait()
    assert full.is_file() and not (out / "compare.json").exists()
    finished_at = full.stat().st_mtime_ns
    partial = subprocess.run([*command, "--tables-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert partial.returncode == 0, partial.stdout[-2000:] + partial.stderr[-2000:]
    doc = json.loads((out / "compare.json").read_text())
    assert doc["unfinished_runs"] > 0 and {r["method"] for r in doc["summary"]} == {"full"}
    assert "Partial:" in (out / "compare.md").read_text()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert "== full\n" not in said and "== grid/k8" in said
    assert full.stat().st_mtime_ns == finished_at
    doc = json.loads((out / "compare.json").read_text())
    assert doc["unfinished_runs"] == 0 and "Partial:" not in (out / "compare.md").read_text()
    methods = {(r["method"], r["target_cr"]) for r in doc["summary"]}
    assert methods == {("full", 1.0), ("grid", 4.0)}
    assert (out / "compare.md").is_file() and (out / "pareto.png").is_file()


def test_grid_offers_the_widest_uniform_width_within_each_budget():
    settings = Settings(configs=(), data={}, models=(), methods=("grid",), crs=(10.0, 20.0, 50.0),
                        seeds=1, out="unused", grid=(1, 2, 8))
    # K = 32: CR 10 fits K' = 3 (CR 10.7), CR 20 and 50 fit K' = 1; K' = 8 stays as listed
    assert Cell(settings, "d", "deepfm", 0).grid_widths(32) == (1, 2, 3, 8)
    assert Cell(settings, "d", "deepfm", 0).grid_widths(16) == (1, 2, 8)


def test_a_retrain_never_runs_on_the_plan_another_budget_left_behind(tmp_path):
    from pipeline.compare.steps import method_steps

    settings = Settings(configs=(TINY,), data={"d": ""}, models=("deepfm",), methods=("dnis_shared",),
                        crs=(10.0,), seeds=1, out=str(tmp_path), min_row_lookups=(0, 30))
    cell = Cell(settings, "d", "deepfm", 0)
    cell.dir("search").mkdir(parents=True)
    plan = {"target": {"cr": 10.0}, "allocation": "value", "min_row_lookups": 0}
    (cell.dir("search") / "prune.json").write_text(json.dumps(plan))  # min 0's plan; min 30's prune failed
    _, _, retrain_min0, _, retrain_min30 = method_steps(cell, "dnis_shared", 10.0)
    retrain_min0.prepare()
    with pytest.raises(ValueError, match="not this run's plan"):
        retrain_min30.prepare()


@pytest.mark.parametrize("method, top, basis", [("dnis_shared_int8", 1, "columns"),
                                                ("dnis_shared_half_int8_pca", 2, "principal")])
def test_the_int8_methods_prune_in_an_int8_budget_on_quantizable_rungs_then_quantize(tmp_path, method, top, basis):
    from pipeline.compare.steps import method_steps

    settings = Settings(configs=(TINY,), data={"d": str(tmp_path / "data")}, models=("deepfm",),
                        methods=(method,), crs=(10.0,), seeds=1, out=str(tmp_path), min_row_lookups=(30,))
    cell = Cell(settings, "d", "deepfm", 0)
    _, prune, retrain, quantize = method_steps(cell, method, 10.0)
    ladder = [2**i for i in range(1, (cell.embedding_dim() // top).bit_length())]
    assert prune.command[prune.command.index("--widths") + 1] == ",".join(map(str, ladder))
    assert prune.command[prune.command.index("--bits") + 1] == "8"
    assert prune.command[prune.command.index("--basis") + 1] == basis
    assert quantize.command[-2:] == ["--bits", "8"] and str(cell.dir(method, "cr10", "min30")) in quantize.command
    cell.dir("search").mkdir(parents=True)
    projection = "learned" if basis == "principal" else "selection"
    plan = {"target": {"cr": 10.0}, "allocation": "value", "min_row_lookups": 30, "widths": ladder,
            "basis": basis, "projection": projection}
    (cell.dir("search") / "prune.json").write_text(json.dumps(plan))  # dnis_shared_ladder-like: fp32 budget
    with pytest.raises(ValueError, match="not this run's plan"):
        retrain.prepare()
    (cell.dir("search") / "prune.json").write_text(json.dumps({**plan, "bits": 8}))
    retrain.prepare()


@pytest.mark.parametrize("method", ["dnis_ladder", "dnis_shared_ladder", "dnis_shared_half", "dnis_shared_narrow",
                                    "dnis_shared_half_me", "dnis_shared_half_pca"])
def test_the_ladder_methods_prune_on_doubling_widths_and_never_retrain_another_plan(tmp_path, method):
    from pipeline.compare.steps import method_steps

    settings = Settings(configs=(TINY,), data={"d": str(tmp_path / "data")}, models=("deepfm",),
                        methods=(method,), crs=(10.0,), seeds=1, out=str(tmp_path), min_row_lookups=(30,))
    cell = Cell(settings, "d", "deepfm", 0)
    cell.dir("search").mkdir(parents=True)
    _, prune, retrain = method_steps(cell, method, 10.0)
    top = cell.embedding_dim() // {"dnis_shared": 2, "dnis_shared_narrow": 4}.get(method.split("_half")[0], 1)
    ladder = ",".join(str(2**i) for i in range(top.bit_length()))
    assert prune.command[prune.command.index("--widths") + 1] == ladder
    floor = 0 if method == "dnis_ladder" else 30
    assert prune.command[prune.command.index("--min_row_lookups") + 1] == str(floor)
    plan = {"target": {"cr": 10.0}, "allocation": "value", "min_row_lookups": floor}
    (cell.dir("search") / "prune.json").write_text(json.dumps(plan))  # dnis_value's plan: every width
    with pytest.raises(ValueError, match="not this run's plan"):
        retrain.prepare()
    plan["widths"] = [int(w) for w in ladder.split(",")]
    basis, projection = (prune.command[prune.command.index(f"--{o}") + 1] for o in ("basis", "projection"))
    assert (basis, projection) == ("principal" if method.endswith("_pca") else "columns",
                                   "learned" if method.endswith(("_pca", "_me")) else "selection")
    if projection == "learned":  # the same widths, sized for the selection or on the tables' own columns
        (cell.dir("search") / "prune.json").write_text(json.dumps(plan))
        with pytest.raises(ValueError, match="not this run's plan"):
            retrain.prepare()
    (cell.dir("search") / "prune.json").write_text(json.dumps({**plan, "basis": basis, "projection": projection}))
    retrain.prepare()
