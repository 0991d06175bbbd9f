"""The stage runs of every (method, budget) of a compare cell, as resumable ``Step``s.

Every training-like stage is the project's TorchX component (``launch/components.py``)
run with ``torchx run -s <scheduler>``, so a compare uses the same entry points, ranks
and run directories as a user would; quantisation runs ``launch.quantize`` in one
process. A step is done when its output exists (``result.json``, an entry of
``fine_prune.json``, ``quantized_int8.json``); a run directory left by a killed step is
continued with ``--resume``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.compare.plans import mde_plan, random_plan
from pipeline.compare.protocol import SHARED_METHODS, Cell, Step, cr_tag
from pipeline.config import load_config, save_config
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import DatasetMeta
from pipeline.prune.knapsack import doubling_widths
from pipeline.prune.plan import group_ranges
from pipeline.search.blocking import compute_blocking
from plans.bytes import PROJECTIONS, unpruned_bytes

ROOT = Path(__file__).resolve().parents[2]
RESULT = "result.json"


def finished(run_dir: Path, name: str = RESULT) -> bool:
    return (run_dir / name).is_file()


def fine_done(run_dir: Path, cr: float) -> bool:
    """Whether ``fine_prune.json`` holds the entry of target ``cr``."""
    path = run_dir / "fine_prune.json"
    return path.is_file() and any(e["target_cr"] == cr for e in json.loads(path.read_text())["results"])


def torchx(cell: Cell, component: str, *args: str) -> list[str]:
    """``torchx run`` of one of the project's components on ``nproc`` ranks."""
    s = cell.settings
    return [
        str(Path(sys.executable).with_name("torchx")), "--log_level", "WARNING", "run", "-s", s.scheduler,
        f"{ROOT}/launch/components.py:{component}", "--nproc", str(s.nproc), *args,
    ]


def _configs(cell: Cell) -> list[str]:
    return [a for c in cell.settings.configs for a in ("--config", c)]


def train_step(cell: Cell, name: str, run_dir: Path, epochs: int, *extra: str, stage: str = "train") -> Step:
    (config, *more) = cell.settings.configs
    if more:
        raise ValueError("dnis compare runs TorchX components, which take one --config: merge the files")
    overrides = ",".join(cell.overrides(run_dir, epochs, *extra))
    return Step(
        name, lambda: finished(run_dir),
        torchx(cell, stage, "--config", config, "--overrides", overrides, "--resume", "True"),
        log=run_dir.with_name(run_dir.name + ".log"),
    )


@dataclass(frozen=True)
class PruneVariant:
    """How a value prune shapes its plan besides the budget: its widths, budget ``bits``,
    ``basis`` (``columns`` or ``principal``) and the projection the plan is sized for."""

    widths: Optional[list[int]] = None
    bits: Optional[int] = None
    basis: str = "columns"
    projection: str = "selection"

    def matches(self, doc: dict) -> bool:
        """Whether ``prune.json`` (``doc``) was written for this variant."""
        return (doc.get("widths") == self.widths and doc.get("bits") == self.bits
                and doc.get("basis", "columns") == self.basis and doc.get("projection", "selection") == self.projection)

    def args(self) -> list[str]:
        """The prune component's arguments for this variant."""
        out = ["--widths", ",".join(map(str, self.widths))] if self.widths else []
        out += ["--bits", str(self.bits)] if self.bits else []
        return out + ["--basis", self.basis, "--projection", self.projection]

    def log_tag(self) -> str:
        """What tells this variant's prune log apart (the ladders to K, K/2, K/4 too)."""
        ladder = f"-ladder{max(self.widths)}" if self.widths else ""
        quantized = f"-int{self.bits}" if self.bits else ""
        turned = f"-{self.basis}" if self.basis != "columns" else ""
        return ladder + quantized + turned + ("-learned" if self.projection == "learned" and not turned else "")


def structured_done(
    source: Path, cr: float, allocation: str, min_row_lookups: float = 0, variant: PruneVariant = PruneVariant(),
) -> bool:
    """Whether the source's ``prune.json`` is the plan of target ``cr`` by ``allocation``
    (with these ``min_row_lookups`` and this ``variant``)."""
    path = source / "prune.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    return (doc.get("target", {}).get("cr") == cr and doc.get("allocation") == allocation
            and doc.get("min_row_lookups", 0) == min_row_lookups and variant.matches(doc))


def prune_step(
    cell: Cell, name: str, source: Path, cr: float, mode: str, done=None, allocation: str = "threshold",
    min_row_lookups: float = 0, variant: PruneVariant = PruneVariant(),
) -> Step:
    """``dnis prune`` of ``source``; a structured one is done when ``done()`` (its retrain)."""
    if mode == "fine":
        wrote = lambda: fine_done(source, cr)  # noqa: E731
    else:
        wrote = lambda: structured_done(source, cr, allocation, min_row_lookups, variant)  # noqa: E731
    command = torchx(cell, "prune", "--run_dir", str(source), "--cr", f"{cr:g}", "--mode", mode,
                     "--allocation", allocation, "--min_row_lookups", f"{min_row_lookups:g}")
    command += variant.args() if mode == "structured" else []
    shared = f"-min{min_row_lookups:g}" if min_row_lookups else ""
    tag = variant.log_tag()
    return Step(name, done or wrote, command, succeeded=wrote,
                log=source.parent / f"{source.name}.prune-{mode}-{allocation}{tag}{shared}-{cr_tag(cr)}.log")


def retrain_step(cell: Cell, name: str, source: Path, out: Path, epochs: int, init: str, planned=None) -> Step:
    """``dnis retrain`` of ``source``'s ``prune.json``; with ``planned``, only when it says
    the plan there is this run's (a prune that failed leaves another budget's plan)."""
    overrides = ",".join([f"train.epochs={epochs}"])

    def check() -> None:
        if planned is not None and not planned():
            raise ValueError(f"{source / 'prune.json'} is not this run's plan: its prune did not finish")

    return Step(
        name, lambda: finished(out),
        torchx(cell, "retrain", "--run_dir", str(source), "--out", str(out), "--init", init,
               "--overrides", overrides, "--resume", "True"),
        prepare=check, log=out.with_name(out.name + ".log"),
    )


def quantize_step(name: str, run_dir: Path, bits: int) -> Step:
    command = [sys.executable, "-m", "launch.quantize", "--run-dir", str(run_dir), "--bits", str(bits)]
    return Step(name, lambda: finished(run_dir, f"quantized_int{bits}.json"), command,
                log=run_dir.parent / f"{run_dir.name}.int{bits}.log")


def plan_step(cell: Cell, name: str, plan_dir: Path, method: str, cr: float, candidate: int = 0) -> Step:
    """Write a baseline's width plan (``prune.json`` + the resolved ``config.yaml``)."""
    def write() -> None:
        cfg = load_config(list(cell.settings.configs), cell.overrides(plan_dir, cell.settings.epochs))
        meta = DatasetMeta.load(cfg.data.path)
        layout = FeatureLayout.from_config(meta, cfg.data)
        b = cfg.blocking
        groups = group_ranges(compute_blocking(layout.counts, b.num_blocks, b.mode, b.per_field), layout.num_embeddings)
        dim = cfg.model.embedding_dim
        unpruned = unpruned_bytes(sum(layout.num_embeddings.values()), dim)
        if method == "mde":
            projection = "learned"
            plan = mde_plan(groups, layout.counts, dim, unpruned / cr, cell.settings.mde_temperature)
        else:
            projection = "selection"
            rng = np.random.default_rng([cell.seed, int(cr * 1000), candidate])
            plan = random_plan(groups, dim, unpruned / cr, rng)
        plan_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, plan_dir / "config.yaml")
        doc = {
            "method": method, "target": {"cr": cr}, "projection": projection,
            "compression_ratio": {p: plan.compression_ratio(p) for p in PROJECTIONS},
            "embedding_bytes": {p: plan.embedding_bytes(p) for p in PROJECTIONS},
            "unpruned_bytes": plan.unpruned_bytes(), "plan": plan.to_json(),
        }
        tmp = plan_dir / "prune.json.tmp"
        tmp.write_text(json.dumps(doc))
        tmp.replace(plan_dir / "prune.json")

    return Step(name, lambda: finished(plan_dir, "prune.json"), prepare=write)


def shared_variant(method: str, cell: Cell) -> PruneVariant:
    """The prune of a ``SHARED_METHODS`` method: every width in fp32, the doubling ladder
    (up to K, K/2 or K/4), or with ``_int8`` that ladder (up to K for ``dnis_shared_int8``)
    from 2 in an INT8 budget (each rung quantizes);
    ``_me`` methods size the plan for the learned projection, ``_pca`` ones also prune
    each feature's principal columns."""
    base = method.removesuffix("_pca").removesuffix("_me")
    basis = "principal" if method.endswith("_pca") else "columns"
    projection = "learned" if base != method else "selection"
    int8 = base.endswith("_int8")
    base = base.removesuffix("_int8")
    divisor = {"dnis_shared_ladder": 1, "dnis_shared_half": 2, "dnis_shared_narrow": 4}.get(base, 1 if int8 else None)
    if divisor is None:  # every width
        return PruneVariant(None, None, basis, projection)
    widths = doubling_widths(max(1, cell.embedding_dim() // divisor))  # the ladder up to K / divisor
    if int8:  # from 2: every rung quantizes
        return PruneVariant([w for w in widths if w >= 2], 8, basis, projection)
    return PruneVariant(widths, None, basis, projection)


def method_steps(cell: Cell, method: str, cr: float) -> list[Step]:
    """The steps of ``method`` at budget ``cr`` in ``cell`` (shared ones repeat by name)."""
    s, tag = cell.settings, cr_tag(cr)
    E, R = s.epochs, cell.retrain_epochs
    full, warm, search = cell.dir("full"), cell.dir("warm"), cell.dir("search")
    full_step = train_step(cell, "full", full, E)
    warm_step = train_step(cell, "warm", warm, s.search_epochs)
    search_step = train_step(cell, "search", search, s.search_epochs, stage="search")
    if method == "full":
        return [full_step]
    if method == "grid":
        return [train_step(cell, f"grid/k{k}", cell.dir("grid", f"k{k}"), E, f"model.embedding_dim={k}")
                for k in cell.grid_widths(cell.embedding_dim())]
    if method in ("int8", "int4"):
        return [full_step, quantize_step(f"full/{method}", full, int(method[3:]))]
    if method in SHARED_METHODS:
        steps = [search_step]
        variant = shared_variant(method, cell)
        for c in s.min_row_lookups:
            name, out = f"{method}/{tag}/min{c:g}", cell.dir(method, tag, f"min{c:g}")
            planned = lambda c=c: structured_done(search, cr, "value", c, variant)  # noqa: E731
            steps += [prune_step(cell, f"{name}/prune", search, cr, "structured", lambda out=out: finished(out), "value",
                                 c, variant),
                      retrain_step(cell, name, search, out, R, "source", planned)]
            steps += [quantize_step(f"{name}/int{variant.bits}", out, variant.bits)] if variant.bits else []
        return steps
    if method in ("dnis", "dnis_int8", "dnis_value", "dnis_ladder", "magnitude"):
        source, first = (warm, warm_step) if method == "magnitude" else (search, search_step)
        name = f"{'dnis' if method == 'dnis_int8' else method}/{tag}"
        out = cell.dir(name)
        allocation = "value" if method in ("dnis_value", "dnis_ladder") else "threshold"
        variant = PruneVariant(doubling_widths(cell.embedding_dim()) if method == "dnis_ladder" else None)
        prune = prune_step(cell, f"{name}/prune", source, cr, "structured", lambda: finished(out), allocation, 0, variant)
        planned = lambda: structured_done(source, cr, allocation, 0, variant)  # noqa: E731
        steps = [first, prune, retrain_step(cell, name, source, out, R, "source", planned)]
        return steps + ([quantize_step(f"{name}/int8", out, 8)] if method == "dnis_int8" else [])
    if method in ("dnis_fine", "magnitude_fine"):
        source, first = (warm, warm_step) if method == "magnitude_fine" else (search, search_step)
        return [first, prune_step(cell, f"{method}/{tag}", source, cr, "fine")]
    if method == "mde":
        plan_dir, out = cell.dir("mde", tag, "plan"), cell.dir("mde", tag, "run")
        return [plan_step(cell, f"mde/{tag}/plan", plan_dir, "mde", cr),
                retrain_step(cell, f"mde/{tag}", plan_dir, out, E, "scratch")]
    if method == "random":
        steps = []
        for i in range(s.candidates):
            plan_dir, out = cell.dir("random", tag, f"c{i}", "plan"), cell.dir("random", tag, f"c{i}", "run")
            steps += [plan_step(cell, f"random/{tag}/c{i}/plan", plan_dir, "random", cr, i),
                      retrain_step(cell, f"random/{tag}/c{i}", plan_dir, out, E, "scratch")]
        return steps
    if method == "qr":
        return [train_step(cell, f"qr/{tag}", cell.dir("qr", tag), E, "model.embedding=qr", f"model.qr_target_cr={cr:g}")]
    if method == "nis_me":
        nis, out = cell.dir("nis_me", tag, "search"), cell.dir("nis_me", tag, "run")
        return [train_step(cell, f"nis_me/{tag}/search", nis, s.search_epochs, f"nis.target_cr={cr:g}", stage="nis"),
                retrain_step(cell, f"nis_me/{tag}", nis, out, R, "scratch")]
    raise ValueError(f"unknown method {method!r}")
