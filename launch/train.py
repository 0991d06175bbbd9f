"""Plain training of the configured model on full-width TorchRec tables: the reference
every search and retrain is compared with.

    python -m launch.train --config configs/synthetic.yaml
    torchx run -s local_cwd launch/components.py:train --config configs/synthetic.yaml --nproc 2
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from launch.common import evaluate_test_split, fit, shard, stage_parser, start
from pipeline.tasks import build_train_task


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    job = start(args)
    dmp, optimizer = shard(job, build_train_task(job.cfg, job.layout, torch.device("meta")))
    train = job.reader("train", train=True)
    fit(
        job, dmp, optimizer, lambda epoch, start, _: train.batches(epoch, start),
        train.num_batches(), resume=args.resume,
    )
    evaluate_test_split(job, dmp, "train")


if __name__ == "__main__":
    main()
