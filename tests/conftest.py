"""Fixtures shared by the entry-point tests: one tiny synthetic dataset, one finished
2-rank search, its retrain and one plain train run per test session (each costs ~10-20 s
of spawning on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch_helpers import finish, search_args, torchrun
from pipeline.data import preprocess, synth


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch")
    synth.main(["--rows", "12000", "--seed", "3", "--out", str(root / "raw.txt")])
    preprocess.main([
        "--output", str(root / "data"), "--dataset", "synthetic", "--workers", "1", str(root / "raw.txt"),
    ])
    return root / "data"


@pytest.fixture(scope="session")
def search_run(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank search on the tiny dataset."""
    full = tmp_path_factory.mktemp("search") / "full"
    out = finish(torchrun("launch.search", *search_args(dataset, full)))
    assert "α per block" in out and "test auc" in out
    return full


@pytest.fixture(scope="session")
def retrain_run(search_run, tmp_path_factory) -> Path:
    """A structured prune at CR 4, retrained for a few steps on 2 ranks."""
    finish(torchrun("launch.prune", "--run-dir", str(search_run), "--cr", "4", nproc=1))
    out = tmp_path_factory.mktemp("retrain") / "run"
    finish(torchrun(
        "launch.retrain", "--run-dir", str(search_run), "--out", str(out),
        "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--no-progress",
    ))
    return out


@pytest.fixture(scope="session")
def train_run(dataset, tmp_path_factory) -> Path:
    """A plain (full-table) training run on one rank, as long as the search."""
    out = tmp_path_factory.mktemp("train") / "run"
    finish(torchrun("launch.train", *search_args(dataset, out), nproc=1))
    return out
