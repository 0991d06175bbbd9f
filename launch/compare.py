"""``dnis compare``: every method at equal bytes, one protocol, several seeds.

    dnis compare --config configs/synthetic.yaml --data longtail=runs/lt/data \\
        --data flat=runs/flat/data --methods full,grid,mde,magnitude,qr,int8,dnis \\
        --cr 10,20 --seeds 3 --out runs/compare

Runs each (dataset, model, seed, method, budget) as the project's stages (TorchX
components on ``--nproc`` ranks; see ``pipeline.compare.protocol`` for what each method
runs and the shared budget), skips what a previous (or killed) compare finished, and
writes ``compare.json`` (every row and the mean ± std per method and budget),
``compare.md`` and ``pareto.png`` into ``--out``. ``--smoke`` shrinks every run to a few
steps (minutes on tiny data); ``--tables-only`` runs nothing and writes the outputs of
the runs finished so far (a long compare's partial tables, while it goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from pipeline.compare.output import markdown, pareto_plot
from pipeline.compare.protocol import FIXED_CR, METHODS, Cell, Settings, Step
from pipeline.compare.results import aggregate, method_row
from pipeline.compare.steps import ROOT, method_steps
from pipeline.config import load_config
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import DatasetMeta
from plans.bytes import unpruned_bytes
from launch import run_as_process

# A few steps per run, and sizes that fit the 200-row real samples (~170 train and ~15
# validation rows: NIS needs episodes after its warm-up within one epoch; tables of tens
# of rows, which QR only splits when its threshold allows).
SMOKE = (
    "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=3",
    "data.batch_size=16", "nis.warmup_steps=2", "search.val_batch_size=4", "model.qr_min_rows=8",
)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def parse_args(argv: Optional[Sequence[str]]) -> tuple[Settings, bool]:
    """The compare's settings, and whether to run its missing runs (not ``--tables-only``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config of every run (one file: TorchX components take one)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="a preprocessed dataset to compare on (repeatable; default: the config's data.path)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--cr", default="10,20", help="target compression ratios, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (run.seed 0..N-1)")
    p.add_argument("--models", default="deepfm", help="comma-separated model names")
    p.add_argument("--out", default="runs/compare", help="compare directory (resumable)")
    p.add_argument("--epochs", type=int, default=2, help="total training epochs of every method")
    p.add_argument("--search-epochs", type=int, default=1, help="of which a search (DNIS, NIS, warm-up) spends")
    p.add_argument("--grid", default="1,2,4,8,16", help="uniform widths K' of the grid baseline")
    p.add_argument("--candidates", type=int, default=4, help="random plans per budget (the paper: 16)")
    p.add_argument("--mde-temperature", type=float, default=0.3, help="MDE: width ∝ popularity^T")
    p.add_argument("--min-row-lookups", default="0,10,30,100",
                   help="dnis_shared's candidates: train occurrences each shared row serves at least")
    p.add_argument("--nproc", type=int, default=2, help="ranks of every run")
    p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override of every run (repeatable)")
    p.add_argument("--smoke", action="store_true", help="a few steps per run: checks the whole compare quickly")
    p.add_argument("--tables-only", action="store_true",
                   help="run nothing: write compare.json/md and pareto.png of the runs finished so far")
    args = p.parse_args(argv)
    methods = tuple(args.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    data = dict(item.split("=", 1) for item in args.data) or {
        "data": load_config([args.config]).data.path}
    settings = Settings(
        configs=(str(Path(args.config).resolve()),),
        data={k: str(Path(v).resolve()) for k, v in data.items()},
        models=tuple(args.models.split(",")), methods=methods, crs=_floats(args.cr),
        seeds=args.seeds, out=str(Path(args.out).resolve()), epochs=args.epochs,
        search_epochs=args.search_epochs, grid=tuple(int(k) for k in args.grid.split(",")),
        candidates=args.candidates, mde_temperature=args.mde_temperature,
        min_row_lookups=_floats(args.min_row_lookups), nproc=args.nproc,
        scheduler=args.scheduler, overrides=(*(SMOKE if args.smoke else ()), *args.set),
    )
    return settings, not args.tables_only


def cells(settings: Settings) -> list[Cell]:
    """Seed-major, so a compare stopped early has every dataset and model at its first seeds."""
    return [Cell(settings, d, m, s) for s in range(settings.seeds) for d in settings.data for m in settings.models]


def plan_steps(settings: Settings) -> list[Step]:
    """Every step of the compare, each once (shared stages appear first where needed)."""
    steps: dict[str, Step] = {}
    for cell in cells(settings):
        for method in settings.methods:
            for cr in settings.crs:
                for step in method_steps(cell, method, cr):
                    steps.setdefault(f"{cell.root}/{step.name}", step)
    return list(steps.values())


class StepFailed(Exception):
    """A stage of the compare failed; the message names it and why."""


def execute(step: Step) -> None:
    """Run a step's command, its output in its log; a failure names the log."""
    if step.prepare:
        try:
            step.prepare()
        except ValueError as error:  # a budget no plan of this method can meet
            raise StepFailed(f"{step.name}: {error}") from None
    if not step.command:
        return
    step.log.parent.mkdir(parents=True, exist_ok=True)
    # torchx's local scheduler starts `torchrun` from PATH: this interpreter's one.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(step.log, "w") as log:
        code = subprocess.call(step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not (step.succeeded or step.done)():
        raise StepFailed(f"{step.name} failed (exit {code}): {_cause(step.log)} (log: {step.log})")


def _cause(log: Path) -> str:
    """The line of a failed stage's log that says why: its own one-line error if it
    printed one, else the last exception, else the last error line (not torchx's status lines)."""
    lines = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith(("torchx ", "  "))]
    said = [line for line in lines if "dnis " in line and ":" in line] or [
        line for line in lines if re.search(r"\w(Error|Exception): ", line)] or [
        line for line in lines if "error" in line.lower() and "elastic" not in line]
    return (said or lines or ["(empty log)"])[-1].split("]:", 1)[-1].strip()


def rows(settings: Settings) -> list[dict]:
    """Result rows of every finished (cell, method, budget)."""
    out = []
    for cell in cells(settings):
        cfg = load_config(list(settings.configs), list(cell.overrides(cell.root, settings.epochs)))
        layout = FeatureLayout.from_config(DatasetMeta.load(cfg.data.path), cfg.data)
        dim = cfg.model.embedding_dim
        unpruned = unpruned_bytes(sum(layout.num_embeddings.values()), dim)
        for method in settings.methods:
            crs = settings.crs[:1] if method in FIXED_CR else settings.crs  # one row: its own CR
            out += [r for cr in crs if (r := method_row(cell, method, cr, unpruned, dim))]
    return out


def write_outputs(settings: Settings, failures: Sequence[str] = (), unfinished: int = 0) -> dict:
    """``compare.json`` (``unfinished``: runs not run yet, 0 for a whole compare), ``.md``, plot."""
    found = rows(settings)
    summary = aggregate(found)
    out = Path(settings.out)
    doc = {"settings": asdict(settings), "summary": summary, "rows": found, "failures": list(failures),
           "unfinished_runs": unfinished}
    tmp = out / "compare.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    (out / "compare.md").write_text(markdown(summary, failures, unfinished))
    if summary:
        pareto_plot(summary, out / "pareto.png")
    tmp.replace(out / "compare.json")  # last: a complete compare.json means the rest is written
    return doc


def main(argv: Optional[Sequence[str]] = None) -> dict:
    settings, run = parse_args(argv)
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    pending = [s for s in plan_steps(settings) if not s.done()]
    todo = pending if run else []
    failures = []
    for step in tqdm(todo, desc="compare", unit="run", dynamic_ncols=True):
        tqdm.write(f"== {step.name}")
        try:
            execute(step)
        except StepFailed as failure:  # e.g. a budget a method cannot reach: the rest goes on
            failures.append(f"{step.log.parent if step.log else settings.out}: {failure}")
            tqdm.write(f"failed: {failure}")
    doc = write_outputs(settings, failures, 0 if run else len(pending))
    print(markdown(doc["summary"], failures, doc["unfinished_runs"]))
    if failures:
        raise SystemExit(f"dnis compare: {len(failures)} run(s) failed (listed in compare.md); rerun to retry them")
    return doc


if __name__ == "__main__":
    run_as_process(main)
