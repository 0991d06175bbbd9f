"""Fixtures shared by the entry-point tests: one tiny synthetic dataset and one finished
2-rank search per test session (each costs ~10-20 s of spawning on 2 cores)."""

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
