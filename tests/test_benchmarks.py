"""The benchmarks still run: each one once at a toy size (their numbers mean nothing
here; `make bench` measures). A benchmark that broke against a changed API (as the
search step's did when layouts learned multi-hot keys) fails here, not on a user's
machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch_helpers import ROOT

pytestmark = pytest.mark.multirank  # the step benchmarks spawn 2 ranks

INFERENCE = ["--rows", "3000", "--batches", "1", "8", "--rounds", "1", "--crs", "10"]
TOY = [
    ("search_overhead.py", ["--steps", "1", "--rounds", "1", "--batch", "128", "--val", "32"]),
    ("qr_step.py", ["--steps", "1", "--rounds", "1", "--batch", "128"]),
    ("retrain_step.py", ["--rows", "3000", "--steps", "1", "--rounds", "1", "--crs", "10"]),
    ("column_basis.py", ["--rows", "3000", "--widths", "2"]),
    ("inference.py", [*INFERENCE, "--widths", "2,4,8,16,32"]),
    # principal columns: the learned projection, its Gram term folded block by block
    ("inference.py", [*INFERENCE, "--allocation", "value", "--width-step", "1", "--widths", "1,2,4,8,16",
                      "--basis", "principal", "--fp32-only"]),
]


@pytest.mark.parametrize("script, args", TOY)
def test_benchmark_runs_at_a_toy_size_and_prints_its_ratios(script, args):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "ratio" in done.stdout, done.stdout[-2000:]
