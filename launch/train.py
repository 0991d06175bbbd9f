"""Plain training of the configured model on full-width TorchRec tables: the reference
every search and retrain is compared with; or on the QR baseline's tables
(``--set model.embedding=qr --set model.qr_target_cr=10``).

    python -m launch.train --config configs/synthetic.yaml
    torchx run -s local_cwd launch/components.py:train --config configs/synthetic.yaml --nproc 2

A full-table run exports its best model into ``<run>/model`` (``launch.export``), unless
it trained on multi-hot bags (serving is single-hot).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from launch import run_as_process
from launch.common import evaluate_test_split, fit, shard_run_task, stage_parser, start
from launch.export import export_best
from pipeline.config import ConfigError
from pipeline.tasks import RunTask, build_train_task, qr_plan
from sharding.dmp import barrier


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    job = start(args)
    try:
        plan = qr_plan(job.cfg, job.layout)  # an unreachable QR budget is a config error
    except ConfigError:  # a multi-hot QR feature: data.multi_hot_sizes, not the budget
        raise
    except ValueError as error:
        raise SystemExit(f"dnis train: model.qr_target_cr: {error}") from None
    dmp, optimizer = shard_run_task(job, RunTask(build_train_task(job.cfg, job.layout, torch.device("meta"))))
    train = job.reader("train", train=True)
    fit(
        job, dmp, optimizer, lambda epoch, start, _: train.batches(epoch, start),
        train.num_batches(), resume=args.resume,
    )
    evaluate_test_split(job, dmp, "train", plan.bytes_record() if plan else None)
    if plan is None and job.env.is_main:  # full tables ship as the baseline; QR tables are not served
        job.log(export_best(job.run.path, job.cfg))
    barrier()


if __name__ == "__main__":
    run_as_process(main)
