"""Export a finished run's model as a self-contained artifact that loads without unpickling.

    dnis export --run-dir runs/synthetic/search/retrain            # -> <run-dir>/model
    dnis export --run-dir runs/synthetic/train --checkpoint step_00000100 --out /srv/ctr
    dnis export --run-dir runs/synthetic/search/retrain --exported [int8]   # + model.pt2

One process, no process group. The run's checkpoint (DCP, the trainer's own output) is
read here, never on the serving side; the artifact (``pipeline.inference.artifact``)
holds the weights in safetensors, the config, layout, prune plan and projection in JSON,
and the dataset's vocabulary, so ``load_model`` needs neither the run nor the dataset.
A retrain run ships its repacked tables, a train run its full ones (the baseline); a
search run's α-scaled tables are no served model (prune and retrain it), nor is a run
trained on multi-hot bags (``data.multi_hot_sizes``: serving is single-hot). The retrain
and train stages export their best model into ``<run>/model`` when they finish.
``--exported`` also writes ``model.pt2``: the served model's tensor part (dense values and
ids -> logits) exported by ``torch.export`` with a dynamic batch, fp32 or with int8/int4
tables (``pipeline.inference.exported``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.config import Config, load_config
from pipeline.data.features import FeatureLayout
from pipeline.data.metadata import DatasetMeta
from pipeline.data.vocab import Vocabulary
from pipeline.inference.artifact import EXPORT_DIR, FILES, Artifact, write_artifact
from pipeline.inference.exported import PROGRAM_FILE, export_program
from pipeline.inference.model import multi_hot_refusal, serve_artifact
from pipeline.loop import BEST
from pipeline.tasks import build_run_task
from sharding.checkpoint import load_checkpoint
from launch import run_as_process


# --exported's precisions: the bits of the program's tables (None: fp32, as trained).
PROGRAM_BITS = {"fp32": None, "int8": 8, "int4": 4}


class ExportError(ValueError):
    """A run that cannot be exported: ``run_dir: reason``."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a finished retrain or train run")
    parser.add_argument("--checkpoint", default=BEST, help="checkpoint name under <run-dir>/checkpoints")
    parser.add_argument("--out", help=f"the artifact directory (default: <run-dir>/{EXPORT_DIR})")
    parser.add_argument(
        "--exported", nargs="?", const="fp32", choices=sorted(PROGRAM_BITS),
        help=f"also write {PROGRAM_FILE}, the model exported by torch.export (tables fp32 unless given)",
    )
    return parser.parse_args(argv)


def load_run(run_dir: str | Path, checkpoint: str = BEST) -> Artifact:
    """The model of a retrain or train run's checkpoint, in memory, as ``write_artifact``
    writes it (``pipeline.inference.serve_artifact`` serves it as is).

    Raises:
        ExportError: for a search run, QR tables, a multi-hot run, or a missing run or checkpoint.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config([run_dir / "config.yaml"])
    if cfg.model.embedding != "full":
        raise ExportError(f"{run_dir}: model.embedding={cfg.model.embedding}: only full or repacked tables are served")
    refused = multi_hot_refusal(cfg.data)
    if refused:
        raise ExportError(f"{run_dir}: {refused}")
    try:  # the dataset's metadata and vocabulary, and the checkpoint, must exist
        meta = DatasetMeta.load(cfg.data.path)
        layout = FeatureLayout.from_config(meta, cfg.data)
        built = build_run_task(run_dir, cfg, layout, torch.device("cpu"))
        if built.blocking is not None:
            raise ExportError(
                f"{run_dir}: a search run (its tables are α-scaled); export a train run or a "
                "retrain run (dnis prune, then dnis retrain)"
            )
        load_checkpoint(run_dir / "checkpoints" / checkpoint, built.task, local=True)
        vocab = Vocabulary.load(Path(cfg.data.path) / "vocab")
    except FileNotFoundError as error:
        raise ExportError(str(error).splitlines()[0]) from None
    return Artifact(
        config=cfg, layout=layout, dense_fields=tuple(meta.dense_fields),
        vocab=vocab,
        weights=built.task.state_dict(), plan=built.plan, projection=built.projection,
        source={
            "run_dir": str(run_dir.resolve()), "checkpoint": checkpoint,
            "stage": "retrain" if built.plan is not None else "train",
        },
    )


def export_run(
    run_dir: str | Path, out: Optional[str | Path] = None, checkpoint: str = BEST, exported: Optional[str] = None,
) -> Path:
    """Write the artifact of ``run_dir``'s ``checkpoint`` to ``out`` (default
    ``<run_dir>/model``), atomically; returns ``out``. ``exported`` (a ``PROGRAM_BITS``
    name) adds ``model.pt2`` with tables of that precision.

    Example:
        >>> export_run("runs/synthetic/search/retrain", exported="fp32")   # doctest: +SKIP
        PosixPath('runs/synthetic/search/retrain/model')
    """
    artifact = load_run(run_dir, checkpoint)
    extras = {}
    if exported is not None:
        try:
            served = serve_artifact(artifact, PROGRAM_BITS[exported])
        except ValueError as error:  # a table width FBGEMM cannot quantize to these bits
            raise ExportError(f"{run_dir}: --exported {exported}: {error}") from None
        program = export_program(served)
        extras[PROGRAM_FILE] = lambda path: torch.export.save(program, path)
    return write_artifact(out or Path(run_dir) / EXPORT_DIR, artifact, extras)


def export_best(run_dir: str | Path, cfg: Config) -> str:
    """The log line of a finished train or retrain stage (``cfg``: its config): its best
    model exported into ``<run_dir>/model``, or why a multi-hot run is not."""
    refused = multi_hot_refusal(cfg.data)
    if refused:
        return f"not exported: {refused}"
    return f"exported the best model to {export_run(run_dir)}"


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """``dnis export``; a run that cannot be exported exits 1 with ``dnis export: <reason>``."""
    args = parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.checkpoint, args.exported)
    except ExportError as error:
        raise SystemExit(f"dnis export: {error}") from None
    written = (*FILES, PROGRAM_FILE) if args.exported else FILES
    sizes = {name: (out / name).stat().st_size for name in written}
    print(f"wrote {out}: " + ", ".join(f"{name} {size:,} B" for name, size in sizes.items()))
    return out


if __name__ == "__main__":
    run_as_process(main)
