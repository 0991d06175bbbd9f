"""DNIS search: learn α (which embedding dimensions each frequency block needs) on
sharded TorchRec tables, then evaluate on the test split and write α to the run dir.

    python -m launch.search --config configs/synthetic.yaml
    torchx run -s local_cwd launch/components.py:search --config configs/synthetic.yaml --nproc 2

Writes ``blocking.json``, ``alpha.pt`` (tensor ``[L, K]``, or ``[F*L, K]`` per field),
``alpha.json`` (α, blocking and per-block summary) and ``result.json``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from launch import run_as_process
from launch.common import Job, blocking_for, evaluate_test_split, fit, shard_run_task, stage_parser, start
from pipeline.data.batch import Batch
from pipeline.data.loader import search_batches
from pipeline.search.alpha_table import alpha_rows, format_alpha_table
from pipeline.search.dnis import AlphaUpdater, DNISTask
from pipeline.tasks import RunTask, build_search_task
from plans.blocking import Blocking
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.dmp import start_all_reduce_mean


def alpha_parameter(dmp: nn.Module) -> nn.Parameter:
    """α of the (sharded) α-EBC inside ``dmp``."""
    return next(m for m in dmp.modules() if isinstance(m, AlphaEmbeddingBagCollection)).alpha


def search_train_batches(job: Job, task: DNISTask) -> tuple[Callable[[int, int, int], Iterator[Batch]], int]:
    """``fit``'s train batches for a DNIS task (train rows, plus validation rows on its α
    steps) and the steps per epoch."""
    train = job.reader("train", train=True)
    val = job.reader("val", train=True, batch_key="search.val_batch_size")

    def train_batches(epoch: int, start_step: int, global_step: int) -> Iterator[Batch]:
        task.steps_taken = global_step  # keeps α steps on schedule after a resume
        return search_batches(train, val, task.alpha_interval, epoch, start_step, global_step)

    return train_batches, train.num_batches()


def save_alpha(job: Job, alpha: torch.Tensor, blocking: Blocking, grad_dtype: torch.dtype) -> None:
    """``alpha.pt`` and ``alpha.json`` (rank 0, with the dtype α's gradients were taken
    in: ``search.alpha_grad_dtype`` resolved), and the α table on stdout."""
    alpha = alpha.detach().cpu().clone()
    if job.env.is_main:
        torch.save(alpha, job.run.path / "alpha.pt")
    job.run.write_json("alpha.json", {
        "alpha": alpha.tolist(), "blocking": blocking.to_json(), "blocks": alpha_rows(alpha, blocking),
        "grad_dtype": str(grad_dtype).removeprefix("torch."),
    })
    job.log("α per block (0 = most frequent):\n" + format_alpha_table(alpha, blocking))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    job = start(args)
    cfg = job.cfg
    blocking = blocking_for(job)
    job.run.write_json("blocking.json", blocking.to_json())
    task = build_search_task(cfg, job.layout, blocking, torch.device("meta"))
    dmp, optimizer = shard_run_task(job, RunTask(task, blocking=blocking))
    alpha = alpha_parameter(dmp)
    updater = AlphaUpdater(alpha, cfg.search.alpha_lr, cfg.search.grad_norm_eps, start_all_reduce_mean)
    train_batches, steps_per_epoch = search_train_batches(job, task)
    fit(job, dmp, optimizer, train_batches, steps_per_epoch, [updater], resume=args.resume)
    save_alpha(job, alpha, blocking, task.alpha_grad_dtype)
    evaluate_test_split(job, dmp, "search")


if __name__ == "__main__":
    run_as_process(main)
