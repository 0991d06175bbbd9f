"""CPU inference of the shipped (repacked) model at CR 10 and 20 vs the unpruned model:
latency of a 4096-row batch from raw rows, and the bytes the embeddings hold.

All models come from one search in this process: the unpruned model holds the searched
tables (α folded in), the repacked ones their structured prune for each CR (selection
projection, as ``dnis prune`` + ``dnis retrain`` would start from). Without
``--run-dir`` a synthetic dataset is made and an untrained search model with a seeded α
stands in (latency and memory do not depend on training). Models are timed in
alternation, ``--rounds`` times, one thread per core of this machine.

    python benchmarks/inference.py [--run-dir runs/big/search] [--crs 10 20] [--rounds 7]

Prints per model: CR of its plan, embedding MiB, memory ratio vs unpruned, latency from
raw rows (parse + encode + forward) and of the forward alone (median ms); then
``memory <model>: ...`` and ``latency ratio <model> / unpruned`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

# search_setup puts the repository on sys.path: import it first.
from search_setup import structured_plans, synthetic_search, trained_search

from launch.retrain import repacked_state
from pipeline.data.metadata import DatasetMeta
from pipeline.data.vocab import Vocabulary
from pipeline.inference import ServingModel, read_tsv, serving_model
from pipeline.tasks import build_retrain_task, build_train_task
from sharding.field_embedding import table_name


def serving_models(cfg, layout, blocking, search, args) -> dict[str, tuple[float, ServingModel]]:
    """``name -> (CR of the plan, model)``: unpruned first, then one per target CR
    (and their int8 versions with ``--int8``)."""
    vocab = Vocabulary.load(Path(cfg.data.path) / "vocab")
    dense_fields = DatasetMeta.load(cfg.data.path).dense_fields

    def unpruned() -> torch.nn.Module:
        """The searched tables at full width, α folded in."""
        model = build_train_task(cfg, layout, torch.device("cpu")).model
        embedding = search.model.embedding
        with torch.no_grad():
            for key in layout.keys:
                rows = torch.as_tensor(blocking.block_of(key, range(layout.num_embeddings[key])))
                weight = embedding.ebc.embedding_bags[table_name(key)].weight
                model.embedding.ebc.embedding_bags[table_name(key)].weight.copy_(weight * embedding.alpha[rows])
        return model

    def repacked(plan) -> torch.nn.Module:
        task = build_retrain_task(cfg, layout, plan, "selection", torch.device("cpu"))
        task.load_state_dict(repacked_state(search, plan, layout.keys), strict=False)
        return task.model

    builders = {"unpruned": (1.0, unpruned, None)}
    for cr, plan in structured_plans(cfg, layout, blocking, search, args.crs, args.ranges_per_block).items():
        builders[f"CR {cr:g}"] = (plan.compression_ratio("selection"), partial(repacked, plan), plan)
    models = {}
    for name, (ratio, build, plan) in builders.items():
        models[name] = (ratio, serving_model(build(), layout, vocab, dense_fields, plan))
        if args.int8:
            models[f"{name} int8"] = (ratio, serving_model(build(), layout, vocab, dense_fields, plan, bits=8))
    return models


def time_models(models: dict, block, rounds: int) -> dict[str, tuple[float, float]]:
    """Median ms per model: from raw rows, and the forward of the encoded batch alone."""
    batches = {name: model.encode(block) for name, (_, model) in models.items()}
    times = {name: ([], []) for name in models}
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up
            for name, (_, model) in models.items():
                start = time.perf_counter()
                model.predict(block)
                middle = time.perf_counter()
                model(batches[name])
                end = time.perf_counter()
                times[name][0].append(middle - start)
                times[name][1].append(end - middle)
    return {name: (statistics.median(a[1:]) * 1e3, statistics.median(b[1:]) * 1e3) for name, (a, b) in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished search run (default: synthetic, untrained)")
    parser.add_argument("--raw", help="raw TSV rows to score (default: the synthetic rows; needed with --run-dir)")
    parser.add_argument("--crs", type=float, nargs="+", default=[10.0, 20.0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows (without --run-dir)")
    parser.add_argument("--ranges-per-block", type=int, default=8)
    parser.add_argument("--int8", action="store_true", help="also time every model with int8 tables")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dnis-bench-") as scratch:
        if args.run_dir:
            if not args.raw:
                parser.error("--run-dir needs --raw (raw TSV rows to score)")
            setup = trained_search(args.run_dir, args.raw)
        else:
            setup = synthetic_search(Path(scratch), args.rows)
        cfg, layout, blocking, search, raw = setup
        models = serving_models(cfg, layout, blocking, search, args)
        block = next(read_tsv(raw, block_bytes=1 << 24))[1]
        block = type(block)(**{**block.__dict__, **slice_rows(block, args.batch)})
        timings = time_models(models, block, args.rounds)
    report(models, timings, args.batch)


def slice_rows(block, n: int) -> dict:
    """The first ``n`` rows of a parsed block's row-aligned arrays (``codes`` is
    columns × rows; the dictionaries stay whole)."""
    if len(block.rows) < n:
        raise SystemExit(f"the raw rows give {len(block.rows)} rows in one block, fewer than --batch {n}")
    return {"rows": block.rows[:n], "label": block.label[:n], "codes": block.codes[:, :n]}


def report(models: dict, timings: dict, batch: int) -> None:
    base_bytes = models["unpruned"][1].embedding_bytes()
    base_ms = timings["unpruned"]
    print(f"batch {batch} raw rows, {torch.get_num_threads()} threads, median of rounds")
    print(f"{'model':<10} {'plan CR':>8} {'emb MiB':>9} {'mem ratio':>9} {'raw->p ms':>10} {'forward ms':>10}")
    for name, (cr, model) in models.items():
        held = model.embedding_bytes()
        raw_ms, forward_ms = timings[name]
        print(f"{name:<10} {cr:>8.2f} {held / 2**20:>9.2f} {base_bytes / held:>9.2f} {raw_ms:>10.1f} {forward_ms:>10.1f}")
    for name, (cr, model) in list(models.items())[1:]:
        held = model.embedding_bytes()
        print(f"memory {name}: {held:,} B, unpruned / CR = {base_bytes / cr:,.0f} B, off by {held / (base_bytes / cr) - 1:+.1%}")
        print(f"latency ratio {name} / unpruned: raw {timings[name][0] / base_ms[0]:.2f}, forward {timings[name][1] / base_ms[1]:.2f}")


if __name__ == "__main__":
    main()
