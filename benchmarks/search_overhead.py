"""Wall time of one DNIS search step vs one plain TorchRec training step, same model.

Both run the same DeepFM (K=64, MLP 400x3, the paper's settings) over 26 sharded tables
on 2 CPU ranks (gloo), through the same ``TrainPipelineSparseDist``, on the same train
batches (4096 rows per rank); the search step adds the configured validation rows
(default 1024, the 1:4 setting of ``configs/base.yaml``; also 1:1, 1:4 on every second
step only, and 1:4 with the validation rows' pass in float32 instead of the default
``search.alpha_grad_dtype: auto``) and the α update.

    python benchmarks/search_overhead.py [--steps 5 --rounds 6] [--batch 4096]

Prints one line per setting and ``ratio <search / plain>`` for the default setting:
medians of wall-clock step times, and of process CPU time per step (all threads of
rank 0), which other jobs on the machine disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import launch  # noqa: F401  (its upstream-notice filters: one place for every entry point)
from pipeline.config import load_config
from pipeline.data.batch import Batch, concat_batches
from pipeline.data.metadata import encode_counts
from pipeline.loop import train_pipeline
from pipeline.search.blocking import compute_blocking
from pipeline.search.dnis import AlphaUpdater, autocast_for
from pipeline.tasks import build_search_task, build_train_task
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.dmp import make_optimizer, shard_model, start_all_reduce_mean
from sharding.kjt import single_hot_kjt
from sharding.local_ranks import run_ranks

NUM_TABLES = 26
# Criteo-like spread of table sizes, capped so 26 tables fit a CPU benchmark.
VOCAB = [int(v) for v in np.geomspace(4, 200_000, NUM_TABLES)]


@dataclass(frozen=True)
class Layout:
    """What the task builders read of a ``FeatureLayout``: single-hot tables, no dataset."""

    keys: tuple
    weighted: bool
    num_embeddings: dict
    num_dense: int
    multi_hot_keys: tuple = ()


def zipf_ids(rng: np.random.Generator, vocab: int, rows: int) -> np.ndarray:
    return np.minimum(rng.zipf(1.2, rows) - 1, vocab - 1)


def make_batches(rank: int, rows: int, count: int, layout: Layout) -> list[Batch]:
    rng = np.random.default_rng(rank)
    out = []
    for _ in range(count):
        ids = np.stack([zipf_ids(rng, n, rows) for n in layout.num_embeddings.values()])
        out.append(Batch(
            dense=torch.rand(rows, 13), sparse=single_hot_kjt(list(layout.keys), torch.from_numpy(ids)),
            labels=torch.from_numpy(rng.integers(0, 2, rows)).float(),
        ))
    return out


def step_times(pipeline, it, steps: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each of the next ``steps`` steps over the endless
    iterator ``it`` (one per setting, so the pipeline's prefetched batches stay in step
    with the task)."""
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        pipeline.progress(it)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


class SearchPipeline:
    """The search step as the loop runs it: pipeline step (the α all-reduce started
    between forward and backward, ``train_pipeline``), then the α update hook."""

    def __init__(self, pipeline, updater: AlphaUpdater) -> None:
        self.pipeline, self.updater = pipeline, updater

    def progress(self, it):
        out = self.pipeline.progress(it)
        self.updater.after_step(out)
        return out


def bench(env, steps: int, rounds: int, batch: int, settings: list[tuple[int, int, str]]) -> dict:
    """Median (wall, CPU) step time per setting (α and plain steps alike when α skips
    steps); settings alternate in rounds so drift hits all alike."""
    cfg = load_config(["configs/base.yaml"], [f"data.batch_size={batch}"])
    layout = Layout(tuple(f"C{i + 1}" for i in range(NUM_TABLES)), False,
                    {f"C{i + 1}": n for i, n in enumerate(VOCAB)}, 13)
    meta = torch.device("meta")
    train = make_batches(env.rank, batch, 4, layout)
    counts = {
        k: encode_counts(np.sort(np.bincount(zipf_ids(np.random.default_rng(9), n, 100_000), minlength=n))[::-1])
        for k, n in layout.num_embeddings.items()
    }
    blocking = compute_blocking(counts, cfg.blocking.num_blocks, cfg.blocking.mode)

    def sharded(task):
        torch.manual_seed(0)
        dmp = shard_model(task, env, cfg.train.sparse_optimizer, cfg.train.sparse_lr)
        return dmp, make_optimizer(dmp, cfg.train.dense_lr, cfg.train.sparse_optimizer, cfg.train.sparse_lr)

    runs = {"plain": (train_pipeline(*sharded(build_train_task(cfg, layout, meta)), env.device), itertools.cycle(train))}
    for rows, interval, dtype in settings:
        cfg_i = replace(cfg, search=replace(cfg.search, alpha_interval=interval, alpha_grad_dtype=dtype))
        dmp, optimizer = sharded(build_search_task(cfg_i, layout, blocking, meta))
        alpha = next(m for m in dmp.modules() if isinstance(m, AlphaEmbeddingBagCollection)).alpha
        updater = AlphaUpdater(alpha, cfg.search.alpha_lr, cfg.search.grad_norm_eps, start_all_reduce_mean)
        pipe = train_pipeline(dmp, optimizer, env.device, [updater])
        val = make_batches(env.rank + 100, rows, 4, layout)
        # Validation rows ride along on α steps only (every ``interval``-th step).
        joined = [concat_batches([t, v]) if i % interval == 0 else t for i, (t, v) in enumerate(zip(train, val))]
        runs[setting_name(rows, interval, dtype)] = (SearchPipeline(pipe, updater), itertools.cycle(joined))
    times = {name: [] for name in runs}
    for name, (pipe, batches) in runs.items():
        step_times(pipe, batches, 3)  # warm-up
    for _ in range(rounds):
        for name, (pipe, batches) in runs.items():
            times[name] += step_times(pipe, batches, steps)
    return {name: tuple(statistics.median(column) for column in zip(*t)) for name, t in times.items()}


def setting_name(val_rows: int, interval: int, dtype: str) -> str:
    every = f" every {interval} steps" if interval > 1 else ""
    return f"search val {val_rows}{every}" + (f" in {dtype}" if dtype != "auto" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per setting and round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds over all settings")
    parser.add_argument("--batch", type=int, default=4096, help="train rows per rank")
    parser.add_argument("--val", type=int, default=1024, help="validation rows per α step (default setting)")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks (NCCL takes one per GPU)")
    args = parser.parse_args()
    settings = [(args.val, 1, "auto"), (args.batch, 1, "auto"), (args.val, 2, "auto"), (args.val, 1, "float32")]
    result = run_ranks(bench, args.ranks, args.steps, args.rounds, args.batch, settings)[0]
    (plain, plain_cpu) = result["plain"]
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    print(f"26 tables, K=64, DeepFM, {args.ranks} {device} ranks, train batch {args.batch}/rank, "
          f"median of {args.steps * args.rounds} steps; validation rows' pass (auto) in "
          f"{str(autocast_for('auto')[1]).removeprefix('torch.')}")
    print(f"plain step: {plain * 1e3:.1f} ms (CPU {plain_cpu * 1e3:.1f} ms)")
    for setting in settings:
        wall, cpu = result[setting_name(*setting)]
        print(f"{setting_name(*setting)} / train {args.batch}: {wall * 1e3:.1f} ms  ratio {wall / plain:.3f}"
              f"  (CPU {cpu * 1e3:.1f} ms, ratio {cpu / plain_cpu:.3f})")
    wall, cpu = result[setting_name(*settings[0])]
    print(f"ratio {wall / plain:.3f} (CPU {cpu / plain_cpu:.3f})")


if __name__ == "__main__":
    main()
