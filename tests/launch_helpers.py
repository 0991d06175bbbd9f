"""Running stage entry points under torchrun, and the preprocess TorchX component, from
tests (the fixtures using them live in ``conftest.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 24


# What ``torchx run -s local_cwd launch/components.py:preprocess`` does once its arguments
# are parsed: build the AppDef and hand it to the local_cwd scheduler.
_RUN_PREPROCESS = """
import sys
from torchx.runner import get_runner
from launch.components import preprocess
dataset, min_count, out, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
app = preprocess(output=out, inputs=inputs, dataset=dataset, min_count=min_count, nproc=2)
with get_runner() as runner:
    status = runner.wait(runner.run(app, scheduler="local_cwd"), wait_interval=0.2)
    sys.exit(0 if status.state.name == "SUCCEEDED" else f"torchx: {status}")
"""


def preprocess_component(output: Path, inputs: list[str], dataset: str, min_count: int = 1) -> None:
    """Run the ``preprocess`` TorchX component on 2 local ranks; fail with its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-c", _RUN_PREPROCESS, dataset, str(min_count), str(output), *inputs],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def torchrun(module: str, *args: str, nproc: int = 2) -> subprocess.Popen:
    """``torchrun --nproc_per_node N -m module args`` in its own process group."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "-m", module, *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (torchrun's workers run in their own
    process groups, so killing its group alone leaves them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def search_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", TINY, "--set", f"data.path={data}", "--set", f"run.dir={run_dir}",
        "--set", f"train.max_steps={STEPS}", "--set", "train.checkpoint_every=4",
        "--set", "train.eval_every=4", "--set", "train.log_every=4", "--no-progress", *extra,
    ]


def val_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e["logloss"] for e in map(json.loads, lines) if e["event"] == "val"]
