"""Worker for tests/test_serving.py: a finished run loaded on this job's ranks (any world
size), its logits on the first ``--rows`` rows of the test split (the same rows on every
rank), saved by rank 0 to ``--out``.

    torchrun --nproc_per_node 3 -m tests.rank_logits --run-dir R --out logits.pt
"""

from __future__ import annotations

import argparse

import torch

from launch import run_as_process
from launch.common import load_run
from pipeline.data.loader import SplitReader
from sharding.dmp import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=128)
    args = parser.parse_args()
    env = init_distributed()
    job, dmp, _ = load_run(env, args.run_dir, "best", show_progress=False)
    reader = SplitReader(
        job.cfg.data.path, "test", job.layout, args.rows, shuffle=False, drop_last=False,
        prefetch=0, transform=job.transform,
    )
    batch = next(iter(reader.batches()))
    dmp.eval()
    with torch.no_grad():
        _, out = dmp(batch)
    if env.is_main:
        torch.save({"logits": out["logits"], "world_size": env.world_size}, args.out)


if __name__ == "__main__":
    run_as_process(main)  # as the stages: no interpreter teardown to abort a finished rank under load
