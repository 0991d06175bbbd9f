"""The training loop shared by plain training, search and retraining.

It drives a task module (``forward(batch) -> (loss, outputs)``, usually wrapped in
``DistributedModelParallel``) through TorchRec's ``TrainPipelineSparseDist`` (or the
plain ``TrainPipelineBase``), calls step hooks (the DNIS α update is one), evaluates on
the validation split for early stopping, and checkpoints. It never looks inside the
model, and it never touches a process group itself: checkpoints and metrics do that.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

from pipeline.config import TrainConfig
from pipeline.data.batch import Batch
from pipeline.evaluate import evaluate
from pipeline.progress import progress_bar
from pipeline.run_dir import RunDir
from sharding.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

BEST = "best"


def _detach(pipeline) -> None:
    """Give the model its own forward back (TorchRec's pipeline swaps the EBC's forward);
    ``progress()`` re-attaches by itself."""
    if isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.detach()


def train_pipeline(model: nn.Module, optimizer, device: torch.device, hooks: Sequence[Any] = (),
                   pipelined: bool = True):
    """TorchRec's ``TrainPipelineSparseDist`` (or ``TrainPipelineBase``) over ``model``,
    calling ``after_forward(outputs)`` of each hook that has one between the forward and
    the backward (``AlphaUpdater`` starts its all-reduce there)."""
    forward_hooks = [hook.after_forward for hook in hooks if hasattr(hook, "after_forward")]

    def forward(batch):
        loss, outputs = model(batch)
        for hook in forward_hooks:
            hook(outputs)
        return loss, outputs

    pipeline = TrainPipelineSparseDist if pipelined else TrainPipelineBase
    return pipeline(model, optimizer, device, custom_model_fwd=forward if forward_hooks else None)


class StepHook(Protocol):
    """Called after every training step (and, where it has ``after_forward``, between the
    forward and the backward); its state travels in checkpoints."""

    def after_step(self, outputs: dict[str, torch.Tensor]) -> None: ...

    def metrics(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False


class Trainer:
    """Runs ``model`` over the train split for ``cfg.epochs`` (or ``cfg.max_steps``) steps.

    Args:
        model: the task module (DMP-wrapped or not).
        optimizer: dense + fused optimizer (``sharding.dmp.make_optimizer``).
        cfg: schedule, evaluation, early stopping and checkpoint settings.
        device: where batches go.
        train_batches: ``(epoch, start_step, global_step) -> iterator`` of train batches
            (search batches for DNIS), deterministic so a resumed run sees the same data.
        steps_per_epoch: batches the train iterator yields per epoch (same on every rank).
        val_batches: ``() -> iterable`` of validation batches for early stopping.
        run: the run directory (metrics, checkpoints).
        hooks: step hooks, e.g. ``pipeline.search.dnis.AlphaUpdater``.
        show_progress: tqdm bar (rank 0 only).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        cfg: TrainConfig,
        device: torch.device,
        train_batches: Callable[[int, int, int], Iterator[Batch]],
        steps_per_epoch: int,
        val_batches: Callable[[], Iterable[Batch]],
        run: RunDir,
        hooks: Sequence[StepHook] = (),
        show_progress: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.device = device
        self.train_batches = train_batches
        self.steps_per_epoch = min(steps_per_epoch, cfg.max_steps or steps_per_epoch)
        self.val_batches = val_batches
        self.run = run
        self.hooks = list(hooks)
        self.show_progress = show_progress
        self.state = LoopState()

    # -- checkpoints ---------------------------------------------------------------
    def save(self, name: str, resumable: bool = True) -> Path:
        """Checkpoint the model; ``resumable`` adds optimizer state and marks it latest."""
        extra = {"loop": asdict(self.state), "hooks": [h.state_dict() for h in self.hooks]}
        optimizer = self.optimizer if resumable else None
        return save_checkpoint(self.run.checkpoints / name, self.model, optimizer, extra, resumable)

    def resume(self) -> bool:
        """Continue from the latest checkpoint of the run directory, if there is one."""
        path = latest_checkpoint(self.run.checkpoints)
        if path is None:
            return False
        extra = load_checkpoint(path, self.model, self.optimizer)
        self.state = LoopState(**extra["loop"])
        for hook, state in zip(self.hooks, extra["hooks"]):
            hook.load_state_dict(state)
        self.run.log("resume", checkpoint=path.name, **asdict(self.state))
        return True

    def restore_best(self) -> bool:
        """Load the weights of the best validation pass (early stopping's choice)."""
        best = self.run.checkpoints / BEST
        if self.state.best_step < 0 or not (best / ".metadata").is_file():
            return False
        load_checkpoint(best, self.model)
        return True

    # -- the loop ------------------------------------------------------------------
    def fit(self, validate_first: bool = False) -> LoopState:
        """Train to the end of the schedule or early stop. ``validate_first`` scores the
        starting weights too (a fine-tune then never ends worse on validation than it began)."""
        if validate_first and self.state.global_step == 0 and self.state.best_step < 0:
            self._validate()
        while self.state.epoch < self.cfg.epochs and not self.state.stopped_early:
            self._run_epoch()
            if not self.state.stopped_early:
                self.state.epoch += 1
                self.state.step_in_epoch = 0
        if self.state.best_step != self.state.global_step and not self.state.stopped_early:
            self._validate()
        return self.state

    def _make_pipeline(self):
        return train_pipeline(self.model, self.optimizer, self.device, self.hooks, self.cfg.pipeline)

    def _run_epoch(self) -> None:
        state = self.state
        batches = self.train_batches(state.epoch, state.step_in_epoch, state.global_step)
        pipeline = self._make_pipeline()
        self.model.train()
        bar = progress_bar(
            total=self.steps_per_epoch, initial=state.step_in_epoch,
            desc=f"epoch {state.epoch}", disable=not self.show_progress,
        )
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        while state.step_in_epoch < self.steps_per_epoch:
            try:
                outputs = pipeline.progress(batches)
            except StopIteration:
                break
            for hook in self.hooks:
                hook.after_step(outputs)
            state.step_in_epoch += 1
            state.global_step += 1
            window_loss = window_loss + outputs["loss"].detach()  # stays on device: no sync
            window_steps += 1
            bar.update(1)
            if state.global_step % self.cfg.log_every == 0:
                loss = float(window_loss) / window_steps
                rows = window_steps * int(outputs["labels"].numel())
                self._log_train(loss, rows / (time.perf_counter() - window_start))
                bar.set_postfix(loss=f"{loss:.4f}")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if state.global_step % self.cfg.eval_every == 0:
                _detach(pipeline)
                self._validate()
                if state.stopped_early:
                    break
            if state.global_step % self.cfg.checkpoint_every == 0:
                self.save(f"step_{state.global_step:08d}")
                self._prune_checkpoints()
        bar.close()
        _detach(pipeline)
        close = getattr(batches, "close", None)
        if close is not None:
            close()

    def _log_train(self, loss: float, rows_per_s: float) -> None:
        extra = {}
        for hook in self.hooks:
            extra.update(hook.metrics())
        self.run.log(
            "train", step=self.state.global_step, epoch=self.state.epoch,
            loss=loss, rows_per_s_per_rank=rows_per_s, **extra,
        )

    def _validate(self) -> None:
        state = self.state
        metrics = evaluate(
            self.model, self.val_batches(), self.device,
            max_batches=self.cfg.eval_max_batches, show_progress=self.show_progress, desc="val",
        )
        improved = metrics["logloss"] < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_step, state.bad_evals = metrics["logloss"], state.global_step, 0
            self.save(BEST, resumable=False)
        else:
            state.bad_evals += 1
            state.stopped_early = state.bad_evals >= self.cfg.patience
        self.run.log("val", step=state.global_step, improved=improved, **metrics)
        self.model.train()

    def _prune_checkpoints(self, keep: int = 2) -> None:
        if not self.run.is_main:
            return
        periodic = sorted(self.run.checkpoints.glob("step_*[0-9]"))
        for old in periodic[:-keep]:
            shutil.rmtree(old)
