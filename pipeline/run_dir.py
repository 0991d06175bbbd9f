"""The run directory: resolved config, metrics, checkpoints, α, report.

Layout::

    <run>/config.yaml          resolved config (written once, by rank 0)
    <run>/metrics.jsonl        one JSON object per logged event
    <run>/checkpoints/<name>/  torch.distributed.checkpoint folders (see sharding.checkpoint)
    <run>/alpha.pt, alpha.json α after the search
    <run>/result.json          final metrics of the stage
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, save_config


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RunDir:
    """Paths and writers of one run; only rank 0 writes (``is_main``)."""

    def __init__(self, path: str | Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_config(self, cfg: Config) -> None:
        if self.is_main:
            save_config(cfg, self.path / "config.yaml")

    def log(self, event: str, **values: Any) -> None:
        """Append ``{"event": ..., "time": ..., **values}`` to metrics.jsonl."""
        if not self.is_main:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_main:
            write_json_atomic(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())
