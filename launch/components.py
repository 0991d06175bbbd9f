"""TorchX components of the pipeline: each wraps ``torchx.components.dist.ddp``.

Run one on this machine (gloo on CPU, NCCL on GPUs, the same component)::

    torchx run -s local_cwd launch/components.py:search --config configs/synthetic.yaml --nproc 2

or on Slurm / Kubernetes with ``-s slurm`` / ``-s kubernetes`` and an image. Every
component runs a ``launch.<stage>`` module under ``torchrun``; the module reads its rank
from the environment that ``torchrun`` sets.
"""


from typing import Dict, List, Optional  # torchx 0.7 accepts typing.List/Dict, not list/dict

import torchx.specs as specs
from torchx.components import dist

DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"  # local_cwd ignores it; set one for remote schedulers


def _ddp(
    module: str,
    args: list[str],
    nproc: int,
    nnodes: int,
    gpu: int,
    memMB: int,
    image: str,
    name: str,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    return dist.ddp(
        *args,
        m=module,
        image=image,
        name=name,
        j=f"{nnodes}x{nproc}",
        cpu=max(1, nproc),
        gpu=gpu,
        memMB=memMB,
        env=env,
    )


def preprocess(
    output: str,
    inputs: List[str],
    dataset: str = "criteo_kaggle",
    min_count: int = 1,
    seed: int = 0,
    strict: bool = False,
    memory_mb: int = 2048,
    row_group_rows: int = 1_000_000,
    nproc: int = 2,
    nnodes: int = 1,
    memMB: int = 8192,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """Criteo TSV (plain or .gz) -> parquet shards, vocabulary and metadata.json.

    The ranks split the input files into byte ranges and merge their counts; the output
    equals a single-process run's.

    Args:
        output: dataset directory to write.
        inputs: Criteo files (Kaggle ``train.txt`` or Terabyte ``day_0 .. day_23``).
        dataset: ``criteo_kaggle`` (random 8:1:1 split), ``criteo_1tb`` (split by day)
            or ``synthetic`` (as Kaggle).
        min_count: train-split values seen fewer times share the OOV id.
        seed: seed of the split hash.
        strict: stop at the first bad row instead of writing it to the reject file.
        memory_mb: per-process memory budget (``dnis-preprocess --memory-mb``).
        row_group_rows: rows per parquet row group (at most); pass 2 buffers one per split
            (212 B a row) and writes smaller ones where ``memory_mb`` cannot hold that.
        nproc: processes per node.
        nnodes: nodes.
        memMB: memory per node.
        image: container image (remote schedulers only).
    """
    args = ["--output", output, "--dataset", dataset, "--min-count", str(min_count)]
    args += ["--seed", str(seed), "--memory-mb", str(memory_mb), "--row-group-rows", str(row_group_rows)]
    args += (["--strict"] if strict else []) + list(inputs)
    return _ddp("launch.preprocess", args, nproc, nnodes, 0, memMB, image, "dnis-preprocess")


def _stage(
    module: str,
    config: str,
    overrides: Optional[List[str]],
    resume: bool,
    nproc: int,
    nnodes: int,
    gpu: int,
    memMB: int,
    image: str,
) -> specs.AppDef:
    args = ["--config", config]
    for override in overrides or []:
        args += ["--set", override]
    if resume:
        args.append("--resume")
    return _ddp(module, args, nproc, nnodes, gpu, memMB, image, f"dnis-{module.split('.')[-1]}")


def train(
    config: str,
    overrides: Optional[List[str]] = None,
    resume: bool = False,
    nproc: int = 2,
    nnodes: int = 1,
    gpu: int = 0,
    memMB: int = 16384,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """Plain training on full-width sharded tables (the reference).

    Args:
        config: YAML config (``configs/*.yaml``).
        overrides: ``section.key=value`` overrides of the config.
        resume: continue the run directory's latest checkpoint.
        nproc: processes (ranks) per node; one per GPU when ``gpu`` > 0.
        nnodes: nodes.
        gpu: GPUs per node (0 = CPU with gloo).
        memMB: memory per node.
        image: container image (remote schedulers only).
    """
    return _stage("launch.train", config, overrides, resume, nproc, nnodes, gpu, memMB, image)


def search(
    config: str,
    overrides: Optional[List[str]] = None,
    resume: bool = False,
    nproc: int = 2,
    nnodes: int = 1,
    gpu: int = 0,
    memMB: int = 16384,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """DNIS search of α over frequency blocks on sharded tables.

    Args:
        config: YAML config (``configs/*.yaml``).
        overrides: ``section.key=value`` overrides of the config.
        resume: continue the run directory's latest checkpoint.
        nproc: processes (ranks) per node; one per GPU when ``gpu`` > 0.
        nnodes: nodes.
        gpu: GPUs per node (0 = CPU with gloo).
        memMB: memory per node.
        image: container image (remote schedulers only).
    """
    return _stage("launch.search", config, overrides, resume, nproc, nnodes, gpu, memMB, image)


def nis(
    config: str,
    cr: Optional[float] = None,
    overrides: Optional[List[str]] = None,
    resume: bool = False,
    nproc: int = 2,
    nnodes: int = 1,
    gpu: int = 0,
    memMB: int = 16384,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """NIS-ME baseline: a REINFORCE controller picks dim blocks per frequency block.

    Args:
        config: YAML config (``configs/*.yaml``; the ``nis`` section).
        cr: target compression ratio (default: the config's ``nis.target_cr``).
        overrides: ``section.key=value`` overrides of the config.
        resume: continue the run directory's latest checkpoint.
        nproc: processes (ranks) per node; one per GPU when ``gpu`` > 0.
        nnodes: nodes.
        gpu: GPUs per node (0 = CPU with gloo).
        memMB: memory per node.
        image: container image (remote schedulers only).
    """
    target = [] if cr is None else [f"nis.target_cr={cr}"]
    return _stage("launch.nis", config, list(overrides or []) + target, resume, nproc, nnodes, gpu, memMB, image)


def evaluate(
    run_dir: str,
    split: str = "test",
    checkpoint: str = "best",
    nproc: int = 2,
    nnodes: int = 1,
    gpu: int = 0,
    memMB: int = 16384,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """AUC and logloss of a finished train, search or retrain run on a split (any world size).

    Args:
        run_dir: the run directory.
        split: ``train``, ``val`` or ``test``.
        checkpoint: checkpoint name (``best``, ``latest`` or ``step_...``).
        nproc: processes (ranks) per node.
        nnodes: nodes.
        gpu: GPUs per node (0 = CPU with gloo).
        memMB: memory per node.
        image: container image (remote schedulers only).
    """
    args = ["--run-dir", run_dir, "--split", split, "--checkpoint", checkpoint]
    return _ddp("launch.evaluate", args, nproc, nnodes, gpu, memMB, image, "dnis-evaluate")


def prune(
    run_dir: str,
    cr: float,
    ranges_per_block: int = 8,
    projection: str = "",
    mode: str = "structured",
    allocation: str = "threshold",
    min_row_lookups: float = 0,
    widths: str = "",
    bits: int = 0,
    basis: str = "columns",
    nproc: int = 2,
    nnodes: int = 1,
    gpu: int = 0,
    memMB: int = 16384,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """Prune a finished search (α × column RMS) or train run (magnitude) for a target
    compression ratio.

    Args:
        run_dir: the run directory (``prune.json`` or ``fine_prune.json`` is written there).
        cr: target compression ratio (the pruned bytes never exceed unpruned / cr).
        ranges_per_block: id ranges per (feature, block), each with its own width (structured).
        projection: ``selection`` (fixed) or ``learned`` (NIS-ME) (structured); empty:
            selection, learned with the principal basis.
        mode: ``structured`` (what ships) or ``fine`` (paper eq. 9, COO bytes, evaluated).
        allocation: ``threshold`` (one τ) or ``value`` (worth per byte, any width) (structured).
        min_row_lookups: value allocation: ids of groups seen fewer times than this on
            average share rows, each serving at least this many train occurrences (0: off).
        widths: value allocation: the only widths a group may take, comma-separated
            (e.g. ``1,2,4,8,16,32``); empty: every width.
        bits: value allocation: count the budget in bytes of tables quantized to 8 or 4
            bits (0: fp32).
        basis: ``columns`` (the tables' own) or ``principal`` (each feature's rows turned
            into their principal directions first; learned projection) (structured).
        nproc: processes (ranks) per node; the ranks that held the search's shards.
        nnodes: nodes.
        gpu: GPUs per node (0 = CPU with gloo).
        memMB: memory per node.
        image: container image (remote schedulers only).
    """
    args = ["--run-dir", run_dir, "--cr", str(cr), "--ranges-per-block", str(ranges_per_block)]
    args += (["--projection", projection] if projection else []) + ["--mode", mode, "--allocation", allocation]
    args += ["--min-row-lookups", str(min_row_lookups)] + (["--widths", widths] if widths else [])
    args += (["--bits", str(bits)] if bits else []) + ["--basis", basis]
    return _ddp("launch.prune", args, nproc, nnodes, gpu, memMB, image, "dnis-prune")


def retrain(
    run_dir: str,
    out: str,
    overrides: Optional[List[str]] = None,
    resume: bool = False,
    init: str = "source",
    nproc: int = 2,
    nnodes: int = 1,
    gpu: int = 0,
    memMB: int = 16384,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """Retrain the repacked model of a pruned search or train run (``prune`` first), or
    train a baseline's width plan from scratch.

    Args:
        run_dir: the run directory holding ``prune.json``.
        out: the retrain run directory.
        overrides: ``section.key=value`` overrides of the source's config.
        resume: continue a killed retrain.
        init: ``source`` (the run's best weights, repacked) or ``scratch``.
        nproc: processes (ranks) per node.
        nnodes: nodes.
        gpu: GPUs per node (0 = CPU with gloo).
        memMB: memory per node.
        image: container image (remote schedulers only).
    """
    args = ["--run-dir", run_dir, "--out", out, "--init", init]
    for override in overrides or []:
        args += ["--set", override]
    args += ["--resume"] if resume else []
    return _ddp("launch.retrain", args, nproc, nnodes, gpu, memMB, image, "dnis-retrain")
