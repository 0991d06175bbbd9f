"""What every training-like entry point does: arguments, process group, config, run
directory, dataset, sharding, the loop, and the final test evaluation.

Each stage (``launch.train``, ``launch.search``, ...) only says which task it builds and
which hooks and batches it gives the loop.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import Config, ConfigError, load_config
from pipeline.data.batch import Batch
from pipeline.data.features import FeatureLayout
from pipeline.data.loader import SplitReader, SplitTooSmall
from pipeline.data.metadata import DatasetMeta
from pipeline.evaluate import evaluate
from pipeline.loop import StepHook, Trainer
from pipeline.run_dir import RunDir
from pipeline.search.blocking import compute_blocking
from pipeline.tasks import RunTask, build_run_task
from plans.blocking import Blocking
from sharding.alpha_ebc import split_multi_hot
from sharding.checkpoint import latest_checkpoint, load_checkpoint
from sharding.dmp import DistEnv, init_distributed, make_optimizer, shard_model
from sharding.qr_embedding import QREmbedding, QRKeyWriter
from sharding.repack import KeyRewriter, repacked_constraints


def add_run_options(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    """``--set`` (config overrides), ``--resume`` and ``--no-progress``."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.max_steps=100 (repeatable)",
    )
    if resume:
        parser.add_argument(
            "--resume", action="store_true",
            help="continue the run directory's latest checkpoint (a killed run)",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def stage_parser(description: str) -> argparse.ArgumentParser:
    """Options of the stages that start from configs (train, search)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", action="append", required=True,
        help="YAML config (repeatable; later files override earlier ones)",
    )
    add_run_options(parser)
    return parser


@dataclass
class Job:
    """One stage's process: its rank, config, run directory and dataset."""

    env: DistEnv
    cfg: Config
    run: RunDir
    meta: DatasetMeta
    layout: FeatureLayout
    show_progress: bool
    transform: Optional[Callable[[KeyedJaggedTensor], KeyedJaggedTensor]] = None
    started: float = field(default_factory=time.time)

    @property
    def wall_s(self) -> float:
        """Seconds since this stage's job opened."""
        return round(time.time() - self.started, 1)

    def reader(self, split: str, train: bool, batch_key: Optional[str] = None) -> SplitReader:
        """This rank's reader of ``split``: full shuffled train batches, or padded eval
        batches (every row once over all ranks), of the batch size the config key
        ``batch_key`` holds (``data.batch_size`` or ``data.eval_batch_size`` by default).
        A split too small for one batch per rank is a ``ConfigError`` naming the key."""
        data = self.cfg.data
        batch_key = batch_key or ("data.batch_size" if train else "data.eval_batch_size")
        section, name = batch_key.split(".")
        batch_size = getattr(getattr(self.cfg, section), name)
        try:
            return SplitReader(
                data.path, split, self.layout, batch_size=batch_size,
                rank=self.env.rank, world_size=self.env.world_size, seed=self.cfg.run.seed,
                shuffle=data.shuffle and train, drop_last=train, prefetch=data.prefetch,
                transform=self.transform,
            )
        except SplitTooSmall as error:
            raise ConfigError(f"{error}: lower {batch_key} (now {batch_size})") from None

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)


def start(args: argparse.Namespace) -> Job:
    """Join the job, resolve the config, open the run directory, read the dataset."""
    env = init_distributed()
    cfg = load_config(args.config, args.set)
    return open_job(env, cfg, new_run(env, cfg, args.resume), show_progress=not args.no_progress)


def new_run(env: DistEnv, cfg: Config, resume: bool) -> RunDir:
    """The run directory of ``cfg`` with its resolved config; one that already holds
    checkpoints is only continued (``--resume``), never overwritten."""
    run = RunDir(cfg.run.dir, is_main=env.is_main)
    if not resume and latest_checkpoint(run.checkpoints) is not None:
        raise SystemExit(
            f"{run.path} already holds checkpoints; pass --resume to continue it "
            "or set run.dir to a new directory"
        )
    run.save_config(cfg)
    return run


def open_job(env: DistEnv, cfg: Config, run: RunDir, show_progress: bool = True) -> Job:
    """Seed every generator and read the dataset's metadata for ``cfg``."""
    _seed(cfg.run.seed)
    meta = DatasetMeta.load(cfg.data.path)
    layout = FeatureLayout.from_config(meta, cfg.data)
    return Job(env, cfg, run, meta, layout, env.is_main and show_progress)


def load_run(
    env: DistEnv, run_dir: str, checkpoint: str, overrides: Sequence[str] = (), show_progress: bool = True,
) -> tuple[Job, nn.Module, Optional[Blocking]]:
    """A finished train, search or retrain run, rebuilt (sharded) from its config and checkpoint.

    Returns the job, the DMP-wrapped task holding the checkpoint's weights, and the
    run's blocking (``None`` for a plain training run). ``checkpoint`` is a name under
    ``checkpoints/`` or ``latest``.
    """
    run = RunDir(run_dir, is_main=env.is_main)
    cfg = load_config([run.path / "config.yaml"], list(overrides))
    job = open_job(env, cfg, run, show_progress)
    built = build_run_task(run.path, cfg, job.layout, torch.device("meta"))
    dmp, _ = shard_run_task(job, built)
    path = latest_checkpoint(run.checkpoints) if checkpoint == "latest" else run.checkpoints / checkpoint
    if path is None:
        raise SystemExit(f"{run.checkpoints}: no periodic checkpoint to load")
    load_checkpoint(path, dmp)
    return job, dmp, built.blocking


def blocking_for(job: Job) -> Blocking:
    """Frequency blocking of every feature of the run's layout (``blocking`` config)."""
    cfg = job.cfg.blocking
    return compute_blocking(job.layout.counts, cfg.num_blocks, cfg.mode, cfg.per_field)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shard(job: Job, task: nn.Module, constraints: Optional[dict] = None):
    """``DistributedModelParallel`` around ``task`` (planner ``constraints`` per table
    name, optional) and its combined optimizer."""
    train = job.cfg.train
    dmp = shard_model(task, job.env, train.sparse_optimizer, train.sparse_lr, constraints)
    return dmp, make_optimizer(dmp, train.dense_lr, train.sparse_optimizer, train.sparse_lr)


def shard_run_task(job: Job, built: RunTask):
    """``shard`` for any run's task; a repacked one also gets the key rewrite on its
    batches and planner constraints for its tables, a QR one its quotient/remainder keys,
    a search with multi-hot keys their ids split per α block."""
    constraints = None
    embedding = built.task.model.embedding
    if built.blocking is not None and job.layout.multi_hot_keys:
        job.transform = partial(split_multi_hot, blocking=built.blocking, multi_hot=job.layout.multi_hot_keys)
    elif built.plan is not None:
        job.transform = KeyRewriter(built.plan, job.layout.keys)
        constraints = repacked_constraints(embedding)
    elif isinstance(embedding, QREmbedding):
        job.transform = QRKeyWriter(embedding.plan)
    return shard(job, built.task, constraints)


def fit(
    job: Job,
    model: nn.Module,
    optimizer,
    train_batches: Callable[[int, int, int], Iterator[Batch]],
    steps_per_epoch: int,
    hooks: Sequence[StepHook] = (),
    resume: bool = False,
    validate_first: bool = False,
) -> Trainer:
    """Run the loop (resuming if asked), then load the best validation weights;
    ``validate_first`` lets the starting weights be the best (fine-tuning)."""
    val = job.reader("val", train=False)
    trainer = Trainer(
        model, optimizer, job.cfg.train, job.env.device, train_batches, steps_per_epoch,
        val_batches=val.batches, run=job.run, hooks=hooks, show_progress=job.show_progress,
    )
    if resume and trainer.resume():
        job.log(f"resumed at step {trainer.state.global_step}")
    state = trainer.fit(validate_first)
    trainer.restore_best()
    job.log(
        f"stopped at step {state.global_step} (best step {state.best_step}, "
        f"val logloss {state.best_val_loss:.5f}{', early stop' if state.stopped_early else ''})"
    )
    return trainer


def evaluate_test_split(job: Job, model: nn.Module, stage: str, extra: Optional[dict] = None) -> dict:
    """AUC/logloss on the test split (all ranks), logged and written to ``result.json``
    with the stage's wall time."""
    metrics = evaluate(
        model, job.reader("test", train=False).batches(), job.env.device,
        show_progress=job.show_progress, desc="test",
    )
    job.run.log("test", **metrics)
    job.run.write_json("result.json", {"stage": stage, "test": metrics, "wall_s": job.wall_s, **(extra or {})})
    job.log(f"test auc {metrics['auc']:.5f} logloss {metrics['logloss']:.5f} rows {metrics['rows']}")
    return metrics
