"""CPU serving of the shipped (repacked) model at CR 10 and 20 vs the unpruned model, with
fp32 and int8 tables: latency at batch 1, 64 and 4096 (p50 and p99) and embedding bytes.

All models come from one search in this process: the unpruned model holds the searched
tables (α folded in), the repacked ones their structured prune for each CR (selection
projection, as ``dnis prune`` + ``dnis retrain`` would start from; by default the value
allocation with shared rows below 30 lookups, as ``dnis compare``'s ``dnis_shared``),
each served as ``load_model`` serves it (TorchRec's inference EBC: FBGEMM's TBE with fp32
or int8 rows; the interaction folded onto the pooled slab columns,
``pipeline.models.folded``), and with fp32 tables once more unfolded (``... unfolded``:
the trained model's interaction on the ``[B, F, K]`` fields), to show what the fold
saves. With int8 tables ``CR x`` is the plan whose budget counts INT8 bytes (as
``dnis compare``'s ``dnis_shared_*_int8``: the even widths of ``--widths``), ``CR x fp32
plan`` the fp32 plan quantized (its width-1 slabs stay fp32: ``inference_tables``).
Without ``--run-dir`` a synthetic dataset is made and an untrained search model with a
seeded α stands in (latency and memory do not depend on training). Per batch size the
models are timed in alternation on the same rows, ``--rounds`` times (10× that below
1024 rows: cheap calls, and their p99 needs them), after one warm-up round, in a new
random order each round (seeded): a small call costs more after a model that evicted
more of the caches, and in a fixed order each model always followed the same one (at
batch 1, three runs on both 1M worlds each way: fp32 CR 20 1.08–1.14 in the fixed
order, 0.99–1.02 shuffled; int8 0.92–1.01, shuffled 0.99–1.03); each visit times
``--repeat`` calls of the model in a row. With ``--repeat 1`` every call follows
another model's; a server serving one model is nearer ``--repeat 10``, whose p50 is a
call after one of the same model and whose p99 still holds the first call of each
visit (on the 1M long-tail search the ratios came out the same both ways: README).

    python benchmarks/inference.py [--run-dir runs/big/search --raw rows.tsv] [--crs 10 20]
                                   [--batches 1 64 4096] [--rounds 100] [--repeat 1] [--threads 1]
                                   [--allocation value --min-row-lookups 30 --widths 2,4,8,16,32]
                                   [--fp32-only] [--basis principal]

Each batch is the first rows of the raw file parsed on their own, as a request of that
many rows would be (parsing is not timed). Prints two markdown tables: per (tables,
model) the CR the bytes formula gives (``plans.bytes``, against unpruned fp32),
the embedding MiB held (tables with their zero rows, scales, projections, the serving ids' buffers),
how far that is from unpruned fp32 ÷ CR, and how many times smaller it is than the
unpruned model with the same tables; per (batch, tables, model) p50 and p99 ms from
parsed raw rows (``predict``: encoding + tensor part), p50 of the tensor part alone
(``model(dense, ids)``), and those three over the unpruned model's with the same tables
and batch.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# search_setup puts the repository on sys.path: import it first.
from search_setup import projection_of, structured_plans, synthetic_search, trained_search

from launch.retrain import repacked_state
from pipeline.data.criteo_reader import ParsedBlock, parse_block
from pipeline.data.metadata import DatasetMeta
from pipeline.data.vocab import Vocabulary
from pipeline.inference import serving_model
from pipeline.prune.basis import BASES
from pipeline.prune.knapsack import parse_widths
from pipeline.tasks import build_retrain_task, build_train_task
from plans.bytes import quantized_table_bytes, unpruned_bytes
from sharding.allocator import keep_freed_memory
from sharding.field_embedding import table_name

PRECISIONS = {"fp32": None, "int8": 8}  # tables -> bits of serving_model
SMALL_BATCH = 1024  # batches below it get 10x the rounds


def serving_models(cfg, layout, blocking, search, args) -> dict[tuple[str, str], tuple[float, torch.nn.Module]]:
    """``(tables, name) -> (CR by the bytes formula, served model)``: per precision, the
    unpruned model first, then one per target CR."""
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
        task = build_retrain_task(cfg, layout, plan, projection, torch.device("cpu"))
        task.load_state_dict(repacked_state(search, plan, layout.keys, rotations), strict=False)
        return task.model

    def unpruned_cr(bits) -> float:
        rows, dim = list(layout.num_embeddings.values()), cfg.model.embedding_dim
        return 1.0 if bits is None else unpruned_bytes(sum(rows), dim) / quantized_table_bytes(rows, dim, bits).sum()

    made, rotations = structured_plans(cfg, layout, blocking, search, args.crs, args.ranges_per_block,
                                       args.allocation, args.width_step, args.min_row_lookups, args.widths, args.basis)
    projection = projection_of(rotations)
    plans = {tables: {"unpruned": (None, False)} for tables in PRECISIONS}
    for cr, plan in made.items():
        plans["fp32"][f"CR {cr:g}"] = (plan, True)
        plans["fp32"][f"CR {cr:g} unfolded"] = (plan, False)
    if not args.fp32_only:  # as dnis_shared_*_int8: the budget in INT8 bytes, every rung even
        even = None if args.widths is None else [w for w in args.widths if w % 2 == 0]
        for cr in args.crs:
            try:
                int8, _ = structured_plans(cfg, layout, blocking, search, [cr], args.ranges_per_block, args.allocation,
                                           max(2, args.width_step), args.min_row_lookups, even, args.basis, bits=8)
            except ValueError as refused:  # every column fits: as dnis prune, no plan
                print(f"int8 tables, CR {cr:g}: no plan ({refused})")
                continue
            plans["int8"][f"CR {cr:g}"] = (int8[cr], True)
        plans["int8"].update({f"CR {cr:g} fp32 plan": (plan, True) for cr, plan in made.items()})
    return {
        (tables, name): (
            unpruned_cr(bits) if plan is None else plan.compression_ratio(projection, bits),
            serving_model(unpruned() if plan is None else repacked(plan), layout, vocab, dense_fields, plan, bits,
                          fold),
        )
        for tables, bits in PRECISIONS.items() if bits is None or not args.fp32_only
        for name, (plan, fold) in plans[tables].items()
    }


def time_models(
    models: dict, rows: ParsedBlock, rounds: int, repeat: int = 1,
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """Per model: p50 and p99 ms of ``predict`` on ``rows``, and p50 ms of the tensor part
    alone; each round visits every model and times ``repeat`` calls of each in a row."""
    batch = len(rows.rows)
    inputs = {key: model.encode(rows) for key, (_, model) in models.items()}
    samples = {key: ([], []) for key in models}
    rounds = rounds if batch >= SMALL_BATCH else 10 * rounds
    order, shuffle = list(models), np.random.default_rng(0).shuffle
    with torch.no_grad():
        for round_ in range(rounds + 1):  # the first round warms up
            shuffle(order)  # every model follows every other alike: a call pays for what ran before it
            for key in order:
                model = models[key][1]
                for _ in range(repeat):
                    start = time.perf_counter()
                    model.predict(rows)
                    middle = time.perf_counter()
                    model(*inputs[key])
                    end = time.perf_counter()
                    if round_:
                        samples[key][0].append(middle - start)
                        samples[key][1].append(end - middle)
    return {
        key: (*(np.percentile(raw, [50, 99]) * 1e3), float(np.median(forward)) * 1e3)
        for key, (raw, forward) in samples.items()
    }


def first_rows(path: str | Path, n: int) -> ParsedBlock:
    """The first ``n`` rows of a labelled raw TSV file (plain or gzip), parsed on their own."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        lines = list(itertools.islice(f, n))
    if len(lines) < n:
        raise SystemExit(f"{path}: {len(lines)} rows, fewer than batch {n}")
    return parse_block(b"".join(lines))


def report(models: dict, timings: dict) -> None:
    """The two markdown tables (see the module docstring)."""
    unpruned_fp32 = models["fp32", "unpruned"][1].embedding_bytes()
    print("| tables | model | CR (bytes formula) | emb MiB | vs unpruned fp32 ÷ CR | unpruned (same tables) ÷ this |")
    print("|---|---|---|---|---|---|")
    for (tables, name), (cr, model) in models.items():
        held, base = model.embedding_bytes(), models[tables, "unpruned"][1].embedding_bytes()
        print(f"| {tables} | {name} | {cr:.2f} | {held / 2**20:.2f} | {held / (unpruned_fp32 / cr) - 1:+.1%} "
              f"| {base / held:.2f} |")
    print(f"\n{torch.get_num_threads()} thread(s); ms from parsed raw rows; ratios: over the unpruned model "
          "with the same tables and batch")
    print("| batch | tables | model | p50 ms | p99 ms | tensor part p50 ms "
          "| p50 ratio | p99 ratio | tensor part ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, times in timings.items():
        for tables, name in models:
            got, base = times[tables, name], times[tables, "unpruned"]
            ratios = " | ".join(f"{a / b:.2f}" for a, b in zip(got, base))
            print(f"| {batch} | {tables} | {name} | {got[0]:.2f} | {got[1]:.2f} | {got[2]:.2f} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished search run (default: synthetic, untrained)")
    parser.add_argument("--raw", help="labelled raw TSV rows (default: the synthetic rows; needed with --run-dir)")
    parser.add_argument("--crs", type=float, nargs="+", default=[10.0, 20.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 4096])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1,
                        help="calls of one model in a row per round (1: every call follows another model's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows (without --run-dir)")
    parser.add_argument("--ranges-per-block", type=int, default=8)
    parser.add_argument("--allocation", choices=("threshold", "value"), default="value", help="as dnis prune")
    parser.add_argument("--width-step", type=int, default=2, help="as dnis prune (value allocation)")
    parser.add_argument("--min-row-lookups", type=float, default=30.0, help="as dnis prune (value allocation)")
    parser.add_argument("--widths", type=parse_widths, help="as dnis prune (value allocation), e.g. 2,4,8,16,32")
    parser.add_argument("--fp32-only", action="store_true", help="no int8 tables (half the models to time)")
    parser.add_argument("--basis", choices=BASES, default="columns",
                        help="as dnis prune (principal: the learned projection, folded block by block)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not keep_freed_memory():
        print("note: not glibc; allocator left as it is (timings may vary between runs)")
    with tempfile.TemporaryDirectory(prefix="dnis-bench-") as scratch:
        if args.run_dir:
            if not args.raw:
                parser.error("--run-dir needs --raw (raw TSV rows to score)")
            setup = trained_search(args.run_dir, args.raw)
        else:
            setup = synthetic_search(Path(scratch), args.rows)
        cfg, layout, blocking, search, raw = setup
        models = serving_models(cfg, layout, blocking, search, args)
        timings = {
            batch: time_models(models, first_rows(raw, batch), args.rounds, args.repeat) for batch in args.batches
        }
    report(models, timings)


if __name__ == "__main__":
    main()
