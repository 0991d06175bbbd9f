"""The ``preprocess`` TorchX component on 2 local ranks writes what one process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import preprocess
from pipeline.data.schema import SPLITS
from tests.test_preprocess import REPO, dataset_tables, make_lines, stable_meta, write

# What ``torchx run -s local_cwd launch/components.py:preprocess`` does once its arguments
# are parsed: build the AppDef and hand it to the local_cwd scheduler.
RUN_COMPONENT = """
import sys
from torchx.runner import get_runner
from launch.components import preprocess
out, inputs = sys.argv[1], sys.argv[2:]
app = preprocess(output=out, inputs=inputs, dataset="synthetic", min_count=2, nproc=2)
with get_runner() as runner:
    status = runner.wait(runner.run(app, scheduler="local_cwd"), wait_interval=0.2)
    sys.exit(0 if status.state.name == "SUCCEEDED" else f"torchx: {status}")
"""


@pytest.mark.multirank
def test_torchx_two_ranks_equal_one_process(tmp_path):
    # three inputs with a bad row each: chunks split over both ranks, rejects merged
    inputs = []
    for i in range(3):
        lines = make_lines(700, seed=i)
        lines[10 * i + 5] = "1\tnot a row"
        inputs.append(write(tmp_path / f"part{i}.txt", lines))
    preprocess.main(["--output", str(tmp_path / "one"), "--dataset", "synthetic", "--min-count", "2",
                     "--no-progress", *inputs])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-c", RUN_COMPONENT, str(tmp_path / "two"), *inputs],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert stable_meta(one) == stable_meta(two)
    assert preprocess.DatasetMeta.load(one).files == preprocess.DatasetMeta.load(two).files
    a, b = dataset_tables(one), dataset_tables(two)
    assert all(a[s].equals(b[s]) for s in SPLITS)
    assert (one / "rejects.tsv").read_text() == (two / "rejects.tsv").read_text()
    assert preprocess.DatasetMeta.load(two).rows["rejected"] == 3
