"""Reading a search's run directory, its retrain runs and their prunes into records
(``SearchRun``, ``RetrainRun``, ``StructuredModel``) that ``summary`` turns into the report."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from pipeline.config import Config, load_config
from plans.blocking import Blocking
from plans.bytes import unpruned_bytes
from plans.structured import StructuredPlan

STAGE_EVENTS = ("train", "val", "test", "resume")  # what a stage logs about itself


class ReportError(ValueError):
    """An input run directory is missing a file or holds an unreadable one."""


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; a missing or malformed file names itself."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None


def read_optional_json(path: Path) -> Optional[Any]:
    return read_json(path) if path.is_file() else None


def metrics_span_s(run_dir: Path) -> Optional[float]:
    """Seconds between the first and last event the run logged about itself."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [event["time"] for event in events if event.get("event") in STAGE_EVENTS]
    return round(times[-1] - times[0], 1) if times else None


def stage_wall_s(run_dir: Path, result: dict) -> Optional[float]:
    """The stage's recorded ``wall_s``, else the span of its metrics events."""
    return result["wall_s"] if "wall_s" in result else metrics_span_s(run_dir)


def relative_label(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class StructuredModel:
    """A structurally pruned model: its plan (found in ``plan_source``), the projection it
    ships with, its serving bytes, the wall time of the prune that made the plan and the
    CR that prune was asked for (None: pruned at a given τ)."""

    plan_source: str
    plan: StructuredPlan
    projection: str
    compression_ratio: float
    embedding_bytes: int
    prune_wall_s: Optional[float]
    target_cr: Optional[float] = None

    @classmethod
    def from_prune_json(cls, plan_source: str, doc: dict) -> "StructuredModel":
        projection = doc["projection"]
        return cls(
            plan_source, StructuredPlan.from_json(doc["plan"]), projection,
            doc["compression_ratio"][projection], doc["embedding_bytes"][projection], doc.get("wall_s"),
            (doc.get("target") or {}).get("cr"),
        )

    def as_retrained(self, result: dict) -> "StructuredModel":
        """The same plan as a retrain run shipped it (``result``: maybe another projection)."""
        return dataclasses.replace(
            self, projection=result["projection"], compression_ratio=result["compression_ratio"],
            embedding_bytes=result["embedding_bytes"],
        )


@dataclass(frozen=True)
class RetrainRun:
    """A retrain run: the model it shipped (None when its plan is unknown) and results."""

    source: str
    model: Optional[StructuredModel]
    result: dict
    wall_s: Optional[float]


@dataclass(frozen=True)
class SearchRun:
    """A finished search with its optional structured and fine-grained prunes."""

    path: Path
    cfg: Config
    alpha: dict
    blocking: Blocking
    result: dict
    wall_s: Optional[float]
    pruned: Optional[StructuredModel]
    fine_grained: list[dict]

    @property
    def unpruned_embedding_bytes(self) -> int:
        return unpruned_bytes(sum(self.blocking.block_features), self.cfg.model.embedding_dim)


def load_search(path: Path) -> SearchRun:
    if not (path / "config.yaml").is_file():
        raise ReportError(f"{path}: no config.yaml; is it a search run directory?")
    result = read_json(path / "result.json")
    prune = read_optional_json(path / "prune.json")
    fine = read_optional_json(path / "fine_prune.json")
    return SearchRun(
        path=path,
        cfg=load_config([path / "config.yaml"]),
        alpha=read_json(path / "alpha.json"),
        blocking=Blocking.from_json(read_json(path / "blocking.json")),
        result=result,
        wall_s=stage_wall_s(path, result),
        pruned=StructuredModel.from_prune_json("prune.json", prune) if prune else None,
        fine_grained=fine["results"] if fine else [],
    )


def retrain_dirs(search: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """Every direct subdirectory of ``search`` holding a retrain result, then ``extra``."""
    found = [
        d for d in sorted(search.iterdir())
        if (d / "result.json").is_file() and read_json(d / "result.json").get("stage") == "retrain"
    ]
    known = {d.resolve() for d in found}
    return found + [d for d in extra if d.resolve() not in known]


def load_retrain(path: Path, search: SearchRun) -> RetrainRun:
    """A retrain run; its plan is its own ``prune.json``, or (older runs) the search's
    when the bytes it reports are that plan's."""
    source = relative_label(path, search.path)
    result = read_json(path / "result.json")
    if result.get("stage") != "retrain":
        raise ReportError(f"{path / 'result.json'}: stage {result.get('stage')!r}, expected 'retrain'")
    prune = read_optional_json(path / "prune.json")
    model = None
    if prune is not None:
        model = StructuredModel.from_prune_json(f"{source}/prune.json", prune)
    elif search.pruned is not None and _same_bytes(search.pruned, result):
        model = search.pruned
    shipped = model.as_retrained(result) if model else None
    return RetrainRun(source, shipped, result, stage_wall_s(path, result))


def _same_bytes(pruned: StructuredModel, result: dict) -> bool:
    """Whether ``result``'s embedding bytes are ``pruned``'s plan under its projection."""
    return pruned.plan.embedding_bytes(result["projection"]) == result["embedding_bytes"]
