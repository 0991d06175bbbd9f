"""Wall time of one QR-embedding training step vs one full-table step, same model.

Both run the same DeepFM (``configs/base.yaml``: K=64, MLP 400x3) over the 26 tables of
``search_overhead.py`` (4 to 200,000 rows), through ``TrainPipelineSparseDist`` on one
CPU rank, on the same batches; the QR model (``model.embedding=qr``) gets them rewritten
by ``QRKeyWriter`` beforehand, as the loader thread does, and that rewrite is timed apart.

    python benchmarks/qr_step.py [--cr 10] [--steps 5 --rounds 4] [--batch 4096]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import replace

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

import launch  # noqa: F401  (its upstream-notice filters: one place for every entry point)
from pipeline.config import load_config
from pipeline.tasks import build_train_task, qr_plan
from search_overhead import NUM_TABLES, VOCAB, Layout, make_batches, step_times
from sharding.dmp import make_optimizer, shard_model
from sharding.local_ranks import run_ranks
from sharding.qr_embedding import QRKeyWriter


def bench(env, steps: int, rounds: int, batch: int, target_cr: float) -> dict:
    """Mean step time of each model (rounds alternate so drift hits both alike)."""
    layout = Layout(tuple(f"C{i + 1}" for i in range(NUM_TABLES)), False,
                    {f"C{i + 1}": n for i, n in enumerate(VOCAB)}, 13)
    cfgs = {
        "full": load_config(["configs/base.yaml"], [f"data.batch_size={batch}"]),
        "qr": load_config(["configs/base.yaml"], [
            f"data.batch_size={batch}", "model.embedding=qr", f"model.qr_target_cr={target_cr}",
        ]),
    }
    batches = make_batches(env.rank, batch, 4, layout)
    writer = QRKeyWriter(qr_plan(cfgs["qr"], layout))
    start = time.perf_counter()
    qr_batches = [replace(b, sparse=writer(b.sparse)) for b in batches]
    rewrite_s = (time.perf_counter() - start) / len(batches)
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        train = cfg.train
        dmp = shard_model(build_train_task(cfg, layout, torch.device("meta")), env, train.sparse_optimizer, train.sparse_lr)
        optimizer = make_optimizer(dmp, train.dense_lr, train.sparse_optimizer, train.sparse_lr)
        pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
        runs[name] = (pipeline, itertools.cycle(qr_batches if name == "qr" else batches))
    times = {name: [] for name in runs}
    for pipeline, it in runs.values():
        step_times(pipeline, it, 3)  # warm-up
    for _ in range(rounds):
        for name, (pipeline, it) in runs.items():
            times[name] += [wall for wall, _ in step_times(pipeline, it, steps)]
    plan = qr_plan(cfgs["qr"], layout)
    return {
        **{name: statistics.mean(t) for name, t in times.items()},
        "rewrite": rewrite_s, "cr": plan.compression_ratio(), "qr_tables": len(plan.remainders),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr", type=float, default=10.0, help="model.qr_target_cr")
    parser.add_argument("--steps", type=int, default=5, help="steps per model and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over both models")
    parser.add_argument("--batch", type=int, default=4096, help="train rows per step")
    args = parser.parse_args()
    r = run_ranks(bench, 1, args.steps, args.rounds, args.batch, args.cr)[0]
    print(f"26 tables, K=64, DeepFM, 1 CPU rank, batch {args.batch}, mean of {args.steps * args.rounds} steps")
    print(f"QR: {r['qr_tables']} tables QR, CR {r['cr']:.3f}")
    print(f"full step {r['full'] * 1e3:.1f} ms, QR step {r['qr'] * 1e3:.1f} ms, ratio {r['qr'] / r['full']:.3f}")
    print(f"QR key rewrite (loader thread, not in the step): {r['rewrite'] * 1e3:.2f} ms per batch")


if __name__ == "__main__":
    main()
