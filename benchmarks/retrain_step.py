"""One retraining step of the repacked model vs one step of the plain (unpruned) model:
same batches, same ranks, measured in one run.

Both are the run's model (``configs/synthetic.yaml``: DeepFM, K=32, 1024 rows per rank)
sharded by TorchRec's planner (the repacked tables constrained as ``dnis retrain`` does)
with fused row-wise Adagrad tables, stepped through ``TrainPipelineSparseDist``. The
repacked model gets the same rows through its key rewrite, done before timing (the
loader does it in its prefetch thread; its cost is printed apart). Plans: the structured
prune at each ``--crs`` of a finished search (``--run-dir``), or of an untrained search
model with a seeded α on fresh synthetic rows (``benchmarks/search_setup.py``). Models
are stepped in alternation, ``--rounds`` times ``--steps`` steps.

    python benchmarks/retrain_step.py [--run-dir runs/cmp/out/longtail/deepfm/seed0/search] [--crs 10 20]
                                      [--allocation value --min-row-lookups 30 --widths 1,2,4,8]
                                      [--basis principal]

Prints per model its embedding keys and pooled width (columns the EBC outputs per row)
and mean ms per step, what one key per kept group (the layout before column slabs)
would give, then ``ratio CR <cr>: repacked / plain step <x>`` per plan.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

# search_setup puts the repository on sys.path: import it first.
from search_setup import layout_of, projection_of, structured_plans, synthetic_search, trained_search

from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pipeline.config import load_config
from pipeline.data.batch import Batch
from pipeline.data.loader import SplitReader
from pipeline.prune.basis import BASES
from pipeline.prune.knapsack import parse_widths
from pipeline.tasks import build_retrain_task, build_train_task
from plans.structured import StructuredPlan
from sharding.dmp import make_optimizer, shard_model
from sharding.local_ranks import run_ranks
from sharding.repack import KeyRewriter, repacked_constraints

BATCHES = 4  # distinct batches per rank, cycled


def embedding_shape(task: torch.nn.Module) -> tuple[int, int]:
    """(keys, pooled width) of the task's embedding bag collection."""
    ebc = next(m for m in task.modules() if isinstance(m, EmbeddingBagCollection))
    configs = ebc.embedding_bag_configs()
    return sum(len(c.feature_names) for c in configs), sum(c.embedding_dim * len(c.feature_names) for c in configs)


def bench(env, config: str, overrides: list, plans: dict, projection: str, steps: int, rounds: int) -> dict:
    """Per model: mean seconds per step, its (keys, pooled width), and on rank 0 the
    key rewrite's mean seconds per batch."""
    cfg = load_config([config], overrides)
    layout = layout_of(cfg)
    reader = SplitReader(cfg.data.path, "train", layout, cfg.data.batch_size, env.rank, env.world_size,
                         shuffle=False, prefetch=0)
    batches = list(itertools.islice(reader.batches(), BATCHES))
    meta = torch.device("meta")
    train = cfg.train

    def pipeline(task, constraints=None):
        torch.manual_seed(0)
        dmp = shard_model(task, env, train.sparse_optimizer, train.sparse_lr, constraints)
        opt = make_optimizer(dmp, train.dense_lr, train.sparse_optimizer, train.sparse_lr)
        return TrainPipelineSparseDist(dmp, opt, env.device)

    plain = build_train_task(cfg, layout, meta)
    runs = {"plain": (embedding_shape(plain), pipeline(plain), itertools.cycle(batches))}
    rewrite_s = {}
    for name, doc in plans.items():
        plan = StructuredPlan.from_json(doc)
        task = build_retrain_task(cfg, layout, plan, projection, meta)
        rewriter = KeyRewriter(plan, layout.keys)
        start = time.perf_counter()
        rewritten = [Batch(b.dense, rewriter(b.sparse), b.labels) for b in batches]
        rewrite_s[name] = (time.perf_counter() - start) / len(batches)
        shape = embedding_shape(task)
        runs[name] = (shape, pipeline(task, repacked_constraints(task.model.embedding)), itertools.cycle(rewritten))
    times = {name: [] for name in runs}
    for name, (_, pipe, it) in runs.items():
        for _ in range(3):  # warm-up
            pipe.progress(it)
    for _ in range(rounds):
        for name, (_, pipe, it) in runs.items():
            for _ in range(steps):
                start = time.perf_counter()
                pipe.progress(it)
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.mean(times[name]), runs[name][0], rewrite_s.get(name)) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished search run (default: synthetic, untrained)")
    parser.add_argument("--crs", type=float, nargs="+", default=[10.0, 20.0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per model and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows (without --run-dir)")
    parser.add_argument("--allocation", choices=("threshold", "value"), default="threshold", help="as dnis prune")
    parser.add_argument("--width-step", type=int, default=1, help="as dnis prune (value allocation)")
    parser.add_argument("--widths", type=parse_widths, help="as dnis prune (value allocation), e.g. 1,2,4,8,16,32")
    parser.add_argument("--min-row-lookups", type=float, default=0.0,
                        help="as dnis prune (value allocation; 30: dnis compare's dnis_shared)")
    parser.add_argument("--basis", choices=BASES, default="columns",
                        help="as dnis prune (principal: the plan trains its learned projection)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dnis-bench-") as scratch:
        if args.run_dir:
            cfg, layout, blocking, search, _ = trained_search(args.run_dir)
            config, overrides = str(args.run_dir / "config.yaml"), []
        else:
            cfg, layout, blocking, search, _ = synthetic_search(Path(scratch), args.rows)
            config = str(Path(__file__).parents[1] / "configs" / "synthetic.yaml")
            overrides = [f"data.path={cfg.data.path}"]
        plans, rotations = structured_plans(
            cfg, layout, blocking, search, args.crs, allocation=args.allocation, width_step=args.width_step,
            min_row_lookups=args.min_row_lookups, widths=args.widths, basis=args.basis)
        named = {f"CR {cr:g}": plan.to_json() for cr, plan in plans.items()}
        projection = projection_of(rotations)
        result = run_ranks(bench, args.ranks, config, overrides, named, projection, args.steps, args.rounds)[0]
    plain_s = result["plain"][0]
    print(f"{args.ranks} CPU ranks, batch {cfg.data.batch_size}/rank, K={cfg.model.embedding_dim}, "
          f"mean of {args.steps * args.rounds} steps per model")
    print(f"{'model':<8} {'plan CR':>8} {'keys':>6} {'pooled':>7} {'step ms':>8} {'rewrite ms':>11}")
    for name, (seconds, (keys, width), rewrite) in result.items():
        cr = plans[float(name[3:])].compression_ratio(projection) if name != "plain" else 1.0
        rewrite_ms = f"{rewrite * 1e3:>11.1f}" if rewrite is not None else f"{'-':>11}"
        print(f"{name:<8} {cr:>8.2f} {keys:>6} {width:>7} {seconds * 1e3:>8.1f} {rewrite_ms}")
    for name in list(result)[1:]:
        kept = [g for g in plans[float(name[3:])].groups if g.width]
        print(f"{name}: one key per kept group would be {len(kept)} keys, {sum(g.width for g in kept)} pooled columns")
    for name, (seconds, _, _) in list(result.items())[1:]:
        print(f"ratio {name}: repacked / plain step {seconds / plain_s:.2f}")


if __name__ == "__main__":
    main()
