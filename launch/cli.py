"""``dnis``: one command for every stage, each run in this process (one rank).

    dnis search --config configs/synthetic.yaml
    dnis train --config configs/synthetic.yaml --set train.max_steps=100
    dnis evaluate --run-dir runs/synthetic --split test

For several ranks use the TorchX components (``launch/components.py``), which run the
same modules under ``torchrun``. ``dnis <stage> --help`` lists a stage's options.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from launch import run_as_process

STAGES = {
    "preprocess": "pipeline.data.preprocess",
    "synth": "pipeline.data.synth",
    "train": "launch.train",
    "search": "launch.search",
    "nis": "launch.nis",
    "evaluate": "launch.evaluate",
    "prune": "launch.prune",
    "retrain": "launch.retrain",
    "report": "launch.report",
    "predict": "launch.predict",
    "export": "launch.export",
    "compare": "launch.compare",
    "quantize": "launch.quantize",
    "plan": "launch.plan",
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(__doc__)
        print("stages: " + ", ".join(STAGES))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"dnis: unknown stage {argv[0]!r}")
        return
    stage, rest = argv[0], argv[1:]
    sys.argv = [f"dnis {stage}"] + rest
    importlib.import_module(STAGES[stage]).main(rest)


def console_main() -> None:
    """The ``dnis`` command: ``main`` as a whole process (see ``launch.run_as_process``)."""
    run_as_process(main)


if __name__ == "__main__":
    console_main()
