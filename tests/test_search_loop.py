"""The search loop on 2 CPU ranks: TorchRec's sparse-dist pipeline equals the plain loop
and the α all-reduce started between forward and backward equals a blocking one, and a
run resumed from a checkpoint ends exactly where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from sharding.local_ranks import run_ranks
from pipeline.config import TrainConfig
from pipeline.loop import Trainer
from pipeline.run_dir import RunDir
from pipeline.search.dnis import AlphaUpdater
from search_fixtures import build_task, make_batch
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.dmp import make_optimizer, shard_model, start_all_reduce_mean

pytestmark = pytest.mark.multirank
STEPS = 8


class LossRecorder:
    def __init__(self):
        self.losses = []

    def after_step(self, outputs):
        self.losses.append(outputs["loss"].item())

    def metrics(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class BlockingAlphaUpdate:
    """The α update without ``after_forward``: its all-reduce blocks after the step."""

    def __init__(self, updater):
        self.updater = updater
        self.after_step, self.metrics = updater.after_step, updater.metrics
        self.state_dict, self.load_state_dict = updater.state_dict, updater.load_state_dict


def make_trainer(env, run_dir, pipeline: bool, checkpoint_every=10**9, steps=STEPS, blocking=False):
    task = build_task("multi", torch.device("meta"))
    dmp = shard_model(task, env, "rowwise_adagrad", 0.05)
    optimizer = make_optimizer(dmp, 1e-3, "rowwise_adagrad", 0.05)
    alpha = next(m for m in dmp.modules() if isinstance(m, AlphaEmbeddingBagCollection)).alpha
    recorder = LossRecorder()
    updater = AlphaUpdater(alpha, 1e-2, start_mean=start_all_reduce_mean)

    def train_batches(epoch, start, global_step):
        task.steps_taken = global_step
        return iter([make_batch("multi", seed=1000 * env.rank + i) for i in range(start, steps)])

    cfg = TrainConfig(
        epochs=1, eval_every=10**9, checkpoint_every=checkpoint_every, log_every=2,
        pipeline=pipeline, patience=10,
    )
    trainer = Trainer(
        dmp, optimizer, cfg, env.device, train_batches, steps,
        val_batches=lambda: [make_batch("multi", seed=99 + env.rank, rows=16)],
        run=RunDir(run_dir, is_main=env.is_main),
        hooks=[BlockingAlphaUpdate(updater) if blocking else updater, recorder],
    )
    return trainer, recorder, alpha


def pipelines_agree(env, tmp):
    results = {}
    for flag in (False, True, "blocking"):
        torch.manual_seed(0)
        trainer, recorder, alpha = make_trainer(env, f"{tmp}/pipe_{flag}", pipeline=bool(flag),
                                                blocking=flag == "blocking")
        trainer.fit()
        results[flag] = (recorder.losses, alpha.detach().clone())
    # The sparse-dist pipeline must really pipeline the sharded EBC (not fall back).
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipe = TrainPipelineSparseDist(trainer.model, trainer.optimizer, env.device)
    pipe.progress(iter([make_batch("multi", seed=7)] * 3))
    results["pipelined_modules"] = len(pipe._pipelined_modules)
    return results


def resume_matches(env, tmp):
    torch.manual_seed(0)
    full, _, alpha_full = make_trainer(env, f"{tmp}/full", pipeline=True, checkpoint_every=4)
    full_state = full.fit()
    final_full = {k: v for k, v in full.model.state_dict().items()}
    # A fresh job (new model, new optimizer) picks up the step-4 checkpoint of the same run.
    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    resumed, _, alpha_resumed = make_trainer(env, f"{tmp}/full", pipeline=True, checkpoint_every=10**9)
    from sharding.checkpoint import load_checkpoint

    extra = load_checkpoint(f"{tmp}/full/checkpoints/step_00000004", resumed.model, resumed.optimizer)
    from pipeline.loop import LoopState

    resumed.state = LoopState(**extra["loop"])
    for hook, state in zip(resumed.hooks, extra["hooks"]):
        hook.load_state_dict(state)
    resumed_state = resumed.fit()
    diffs = {}
    for name, tensor in resumed.model.state_dict().items():
        a, b = tensor, final_full[name]
        if hasattr(a, "local_shards"):
            a = torch.cat([s.tensor.flatten() for s in a.local_shards()])
            b = torch.cat([s.tensor.flatten() for s in b.local_shards()])
        diffs[name] = (a - b).abs().max().item()
    return {
        "alpha": (alpha_full - alpha_resumed).abs().max().item(),
        "val_loss": abs(full_state.best_val_loss - resumed_state.best_val_loss),
        "params": max(diffs.values()),
        "resumed_from": extra["loop"]["global_step"],
    }


def test_sparse_dist_pipeline_matches_plain_loop(tmp_path):
    for result in run_ranks(pipelines_agree, 2, str(tmp_path)):
        plain_losses, plain_alpha = result[False]
        piped_losses, piped_alpha = result[True]
        assert len(plain_losses) == STEPS
        assert max(abs(a - b) for a, b in zip(plain_losses, piped_losses)) < 1e-6
        assert (plain_alpha - piped_alpha).abs().max() < 1e-6
        # α's all-reduce started between forward and backward: the same update as blocking.
        assert torch.equal(result["blocking"][1], piped_alpha) and result["blocking"][0] == piped_losses
        assert (plain_alpha < 1).any()  # α moved
        assert result["pipelined_modules"] >= 1


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    for result in run_ranks(resume_matches, 2, str(tmp_path)):
        assert result["resumed_from"] == 4
        assert result["alpha"] < 1e-6, result
        assert result["params"] < 1e-5, result
        assert result["val_loss"] < 1e-5, result
