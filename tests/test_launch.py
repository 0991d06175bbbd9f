"""The stage entry points end to end on 2 CPU ranks: synthetic rows -> dnis-preprocess ->
search (killed with SIGKILL and resumed) -> evaluate on another world size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from launch_helpers import ROOT, TINY, finish, kill_tree, search_args, torchrun, val_losses
from pipeline.data import preprocess, synth
from pipeline.search.dnis import autocast_for
from plans.structured import StructuredPlan

pytestmark = pytest.mark.multirank


def test_search_killed_and_resumed_equals_uninterrupted_run(dataset, search_run, tmp_path):
    full = search_run
    alpha_full = torch.load(full / "alpha.pt")
    assert alpha_full.shape == (4, 16)  # tiny.yaml: L=4, K=16
    assert (alpha_full < 1).any() and (alpha_full >= 0).all()
    doc = json.loads((full / "alpha.json").read_text())
    assert len(doc["blocks"]) == 4 and doc["blocking"]["num_blocks"] == 4
    assert doc["grad_dtype"] == str(autocast_for("auto")[1]).removeprefix("torch.")

    killed = tmp_path / "killed"
    proc = torchrun("launch.search", *search_args(dataset, killed))
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.communicate()
    assert latest.exists() and not (killed / "result.json").exists(), "the run ended before the kill"
    refused = torchrun("launch.search", *search_args(dataset, killed))
    refused.communicate(timeout=300)
    assert refused.returncode != 0  # a run directory with checkpoints needs --resume
    out = finish(torchrun("launch.search", *search_args(dataset, killed, "--resume")))
    assert "resumed at step" in out

    alpha_resumed = torch.load(killed / "alpha.pt")
    assert (alpha_resumed - alpha_full).abs().max() < 1e-5
    assert abs(val_losses(killed)[-1] - val_losses(full)[-1]) < 1e-5
    full_test = json.loads((full / "result.json").read_text())["test"]
    resumed_test = json.loads((killed / "result.json").read_text())["test"]
    assert abs(full_test["logloss"] - resumed_test["logloss"]) < 1e-5

    # The 2-rank checkpoint evaluates on 1 rank to the same test metrics.
    out = finish(torchrun("launch.evaluate", "--run-dir", str(full), "--no-progress", nproc=1))
    evaluated = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()][-1]
    assert evaluated["event"] == "evaluate" and evaluated["rows"] == full_test["rows"]
    assert abs(evaluated["auc"] - full_test["auc"]) < 1e-5
    assert abs(evaluated["logloss"] - full_test["logloss"]) < 1e-5


def test_structured_prune_on_two_ranks_meets_the_budget_and_equals_one_rank(search_run):
    plans = {}
    for nproc in (2, 1):
        out = finish(torchrun("launch.prune", "--run-dir", str(search_run), "--cr", "8", nproc=nproc))
        assert "structured prune" in out and "mean width" in out
        plans[nproc] = json.loads((search_run / "prune.json").read_text())
    assert plans[1]["plan"] == plans[2]["plan"]  # statistics read from shards == whole tables
    result = plans[2]
    budget = result["unpruned_bytes"] / 8
    assert result["embedding_bytes"]["selection"] <= budget
    assert result["embedding_bytes"]["selection"] >= 0.9 * budget
    widths = [g["columns"] for g in result["plan"]["groups"]]
    assert any(len(w) == 0 for w in widths) or any(len(w) < 16 for w in widths)

    unreachable = torchrun("launch.prune", "--run-dir", str(search_run), "--cr", "1e9", nproc=1)
    out, _ = unreachable.communicate(timeout=300)
    assert unreachable.returncode != 0 and "unreachable" in out


def test_value_prune_on_a_width_ladder_keeps_to_its_rungs(search_run):
    args = ("--run-dir", str(search_run), "--cr", "8", "--allocation", "value", "--widths", "1,2,4,8")
    finish(torchrun("launch.prune", *args, nproc=1))
    result = json.loads((search_run / "prune.json").read_text())
    assert result["widths"] == [1, 2, 4, 8]
    assert {len(g["columns"]) for g in result["plan"]["groups"]} <= {0, 1, 2, 4, 8}
    assert 0.9 * result["unpruned_bytes"] / 8 <= result["embedding_bytes"]["selection"] <= result["unpruned_bytes"] / 8
    bad = torchrun("launch.prune", "--run-dir", str(search_run), "--cr", "8", "--allocation", "value",
                   "--widths", "4,2", nproc=1)
    out, _ = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "ascending distinct multiples" in out


def test_value_prune_in_a_quantized_budget_meets_it_counted_in_int8_bytes(search_run):
    args = ("--run-dir", str(search_run), "--cr", "8", "--allocation", "value", "--widths", "2,4,8", "--bits", "8")
    out = finish(torchrun("launch.prune", *args, nproc=1))
    result = json.loads((search_run / "prune.json").read_text())
    plan = StructuredPlan.from_json(result["plan"])
    assert result["bits"] == 8 and "budget in INT8 bytes" in out
    assert result["compression_ratio_quantized"] == plan.compression_ratio("selection", 8)
    assert 8 <= result["compression_ratio_quantized"] <= 8 * 1.1
    assert result["compression_ratio"]["selection"] < 8  # the same plan in fp32 takes more bytes
    bad = torchrun("launch.prune", "--run-dir", str(search_run), "--cr", "8", "--bits", "8", nproc=1)
    out, _ = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "--bits applies to --allocation value" in out


def test_fine_prune_meets_the_budget_and_accumulates_targets(search_run):
    """Eq. 9 for CR 10 on 2 ranks, then CR 4 on 1 rank: two entries, each within budget."""
    for cr, nproc in (("10", 2), ("4", 1)):
        args = ("--run-dir", str(search_run), "--mode", "fine", "--cr", cr)
        out = finish(torchrun("launch.prune", *args, nproc=nproc))
        assert "fine-grained prune" in out and "test auc" in out
    results = json.loads((search_run / "fine_prune.json").read_text())["results"]
    assert [r["target_cr"] for r in results] == [10.0, 4.0]
    for r in results:
        assert r["coo_bytes"] <= r["unpruned_bytes"] / r["target_cr"]
        assert r["target_cr"] <= r["compression_ratio"] <= 1.01 * r["target_cr"]
        assert r["test"]["rows"] > 0 and 0.0 < r["test"]["auc"] < 1.0


def test_retrain_starts_from_the_searched_model_exactly(search_run, tmp_path):
    """τ = 0 keeps every column: the repacked model before retraining is the α-model, so
    its test metrics equal the search's (weights, α folding, key rewrite, sharding)."""
    finish(torchrun("launch.prune", "--run-dir", str(search_run), "--tau", "0", nproc=1))
    out = tmp_path / "retrain"
    finish(torchrun(
        "launch.retrain", "--run-dir", str(search_run), "--out", str(out),
        "--set", "train.max_steps=4", "--no-progress",
    ))
    result = json.loads((out / "result.json").read_text())
    searched = json.loads((search_run / "result.json").read_text())["test"]
    assert result["stage"] == "retrain" and result["compression_ratio"] <= 1.0
    assert abs(result["before_retrain"]["logloss"] - searched["logloss"]) < 1e-5
    assert abs(result["before_retrain"]["auc"] - searched["auc"]) < 1e-5
    assert result["test"]["rows"] == searched["rows"]


def test_principal_columns_at_full_width_retrain_from_the_searched_model_exactly(search_run, tmp_path):
    """τ = 0 on principal columns keeps every one: turned and turned back by the learned
    projection, the repacked model is the α-model; the rotations read from 2 ranks'
    shards equal 1 rank's, and the selection projection is refused for them."""
    source = tmp_path / "search"
    shutil.copytree(search_run, source)
    rotations = {}
    for nproc in (2, 1):
        finish(torchrun("launch.prune", "--run-dir", str(source), "--tau", "0", "--basis", "principal", nproc=nproc))
        pruned = json.loads((source / "prune.json").read_text())
        assert pruned["basis"] == "principal" and pruned["projection"] == "learned"
        rotations[nproc] = torch.tensor([pruned["rotations"][k] for k in sorted(pruned["rotations"])])
    assert torch.allclose(rotations[1].abs(), rotations[2].abs(), atol=1e-4)  # eigenvectors, up to sign
    refused = subprocess.run([sys.executable, "-m", "launch.retrain", "--run-dir", str(source), "--projection",
                              "selection", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "only the learned projection" in refused.stderr.strip().splitlines()[-1]
    out = tmp_path / "retrain"
    finish(torchrun("launch.retrain", "--run-dir", str(source), "--out", str(out), "--set", "train.max_steps=4",
                    "--no-progress"))
    result = json.loads((out / "result.json").read_text())
    searched = json.loads((search_run / "result.json").read_text())["test"]
    assert abs(result["before_retrain"]["logloss"] - searched["logloss"]) < 1e-4
    assert abs(result["before_retrain"]["auc"] - searched["auc"]) < 1e-4


def test_retraining_a_plan_that_keeps_nothing_is_refused_in_one_line(search_run, tmp_path):
    source = tmp_path / "search"
    shutil.copytree(search_run, source)
    finish(torchrun("launch.prune", "--run-dir", str(source), "--tau", "1e9", nproc=1))
    done = subprocess.run([sys.executable, "-m", "launch.retrain", "--run-dir", str(source), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"dnis retrain: {source / 'prune.json'} keeps no column of any group: nothing to train")


def test_train_entry_point_reports_test_metrics(dataset, tmp_path):
    run = tmp_path / "train"
    finish(torchrun("launch.train", *search_args(dataset, run)))
    result = json.loads((run / "result.json").read_text())
    assert result["stage"] == "train" and result["test"]["rows"] > 0
    assert 0.0 < result["test"]["auc"] < 1.0


def test_a_split_too_small_for_its_batch_is_one_line_naming_the_key(dataset, tmp_path):
    args = search_args(dataset, tmp_path / "search", "--set", "search.val_batch_size=1000000")
    done = subprocess.run([sys.executable, "-m", "launch.search", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("dnis search: ") and "val:" in said
    assert said.endswith("lower search.val_batch_size (now 1000000)")


def test_search_finds_the_planted_signal(tmp_path):
    """dnis-synth gives frequent values more latent dimensions than rare ones; after one
    epoch of search the rarest block's α must have shrunk below the most frequent's."""
    synth.main(["--rows", "60000", "--seed", "5", "--out", str(tmp_path / "raw.txt")])
    preprocess.main(["--output", str(tmp_path / "data"), "--dataset", "synthetic", str(tmp_path / "raw.txt")])
    run = tmp_path / "run"
    args = [
        "--config", TINY, "--set", f"data.path={tmp_path / 'data'}", "--set", f"run.dir={run}",
        "--set", "train.max_steps=null", "--set", "data.batch_size=256",
        "--set", "search.val_batch_size=128", "--set", "train.eval_every=1000", "--no-progress",
    ]
    finish(torchrun("launch.search", *args, nproc=1))
    blocks = json.loads((run / "alpha.json").read_text())["blocks"]
    means = [b["mean_alpha"] for b in blocks]
    assert means[0] > means[-1] + 0.05, means
    assert sum(means[:-1]) / (len(means) - 1) > means[-1] + 0.1, means
