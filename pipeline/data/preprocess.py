"""``dnis-preprocess``: raw Criteo TSV (plain or .gz) -> parquet shards, vocabulary, metadata.

Stages (each a plain function; ``run`` chains them, ``launch.preprocess`` runs the same
chain on several ranks with barriers in between):

1. ``prepare``: plan newline-aligned chunks (``_work/plan.json``), or find the output
   finished (a no-op) or half-done (resume).
2. ``count_chunks``: pass 1, per chunk: validate rows, count train-split values.
3. ``sum_counts`` (every rank and worker): sum the counts per field and key range
   (``count_merge``); ``merge_counts`` (rank 0): frequency ranks -> ``vocab/``,
   ``rejects.tsv``, ``_work/merged.json``.
4. ``write_chunks``: pass 2, per chunk: ``train|val|test/<input>.<chunk>.part<k>.parquet``
   (more than one file where the row groups' footers would outgrow the budget).
5. ``finalize``: ``metadata.json`` (last: its presence marks the dataset complete).

Example::

    dnis-preprocess --output data/kaggle --dataset criteo_kaggle --min-count 4 train.txt
    python -m pipeline.data.preprocess --output data/tb --dataset criteo_1tb day_*.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline.data.chunk_passes import (
    FOOTER_ROW_GROUP_BYTES, SHARD_ROW_BYTES, ChunkContext, atomic_write_bytes, count_chunk, counts_path,
    rejects_path, shard_marker, write_chunk,
)
from pipeline.data.count_merge import merge_range, plan_merge, spill_path, write_vocabulary
from pipeline.data.count_runs import COUNT_BYTES_PER_KEY
from pipeline.data.workers import WorkerPool
from pipeline.data.criteo_reader import DATASETS, Chunk, check_sources, plan_chunks, source_name, split_rule
from pipeline.data.metadata import METADATA_FILE, DatasetMeta
from pipeline.data.schema import BUCKET_FIELDS, DENSE_FIELDS, SPARSE_FIELDS, SPLITS
from pipeline.data.vocab import VOCAB_BYTES_PER_KEY

OUTPUT_ENTRIES = ("train", "val", "test", "vocab", "_work", "rejects.tsv", METADATA_FILE)
CHECKSUM = "sha256 over the crc32 of each chunk's uncompressed bytes (chunks of --chunk-mb)"
# Pass-1 memory per block byte. A parsed row costs ~900 B whatever its width (pyarrow's
# 40 offsets and dictionary codes, our codes and temporaries), so the worst case is the
# narrowest row (~45 B, fields empty): ~20x, measured; Criteo-like rows (~240 B) need ~4x.
BLOCK_RSS_FACTOR = 24
# Blocks take at most this share of the budget; pass 1's counts the rest (count_runs), and
# in pass 2 (whose blocks cost less: no text is parsed) the row groups buffered per split
# take ROW_GROUP_SHARE of the rest, the footers the writers hold FOOTER_SHARE (what sets
# the row groups per file), the vocabulary pages of a lookup slice the remainder.
BLOCK_SHARE = 0.75
ROW_GROUP_SHARE = 0.75
FOOTER_SHARE = 1 / 32
# Larger blocks only add page faults and cache misses: 2M rows on 2 workers took 10.5 CPU s
# (3.2 of them system) with 64 MiB blocks, 7.4 with 8 MiB, 8.1 with 4 MiB.
MAX_BLOCK_BYTES = 8 << 20


class PreprocessError(RuntimeError):
    """The output directory cannot be used as asked (options differ, inputs changed)."""


@dataclass(frozen=True)
class Options:
    """Preprocessing options; ``recorded`` are those that shape the output."""

    inputs: tuple[str, ...]
    output: str
    dataset: str = "criteo_kaggle"
    min_count: int = 1
    seed: int = 0
    strict: bool = False
    workers: int = os.cpu_count() or 1
    chunk_mb: int = 64
    row_group_rows: int = 1_000_000
    memory_mb: int = 2048
    overwrite: bool = False
    progress: bool = True

    def recorded(self) -> dict:
        return {
            "inputs": [os.path.abspath(p) for p in self.inputs], "dataset": self.dataset,
            "min_count": self.min_count, "seed": self.seed, "chunk_mb": self.chunk_mb,
            "row_group_rows": self.row_group_rows,
        }

    def context(self) -> ChunkContext:
        """Blocks sized to ``BLOCK_SHARE`` of the budget (at most); what they leave bounds
        pass 1's counts, and pass 2's row groups (one buffered per split), the footers of
        its open files (one per split, ``file_row_groups`` row groups at most) and its
        vocabulary slices, so that each pass fits the budget.

        >>> ctx = Options(("x",), "out", memory_mb=256).context()
        >>> ctx.block_bytes >> 20, ctx.count_keys, ctx.row_group_rows, ctx.file_row_groups, ctx.vocab_slice_keys
        (8, 838860, 79137, 15, 1223338)
        """
        block_bytes = min(self.chunk_mb << 20, int(self.budget_bytes * BLOCK_SHARE) // BLOCK_RSS_FACTOR,
                          MAX_BLOCK_BYTES)
        rest = self.budget_bytes - BLOCK_RSS_FACTOR * block_bytes
        row_groups = int(rest * ROW_GROUP_SHARE)
        row_group_rows = min(self.row_group_rows, max(1, row_groups // (len(SPLITS) * SHARD_ROW_BYTES)))
        footers = int(rest * FOOTER_SHARE)
        return ChunkContext(self.output, self.dataset, self.seed, self.strict, block_bytes,
                            rest // COUNT_BYTES_PER_KEY, row_group_rows,
                            max(1, (rest - row_groups - footers) // VOCAB_BYTES_PER_KEY),
                            max(1, footers // (len(SPLITS) * FOOTER_ROW_GROUP_BYTES)))

    @property
    def budget_bytes(self) -> int:
        """What a process may spend on blocks and on summing counts (the interpreter and
        libraries come on top, about 150 MiB)."""
        return self.memory_mb << 20


def parser(prog: str = "dnis-preprocess") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Criteo TSV (Kaggle train.txt, Terabyte day_0..day_23, or synthetic; plain "
        "or .gz) -> parquet shards per chunk and split, a frequency-rank vocabulary, "
        "rejects.tsv and metadata.json. Resumable; a finished output with equal options is a no-op.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="raw Criteo files (plain or .gz)")
    p.add_argument("--output", required=True, help="dataset directory to write")
    p.add_argument("--dataset", choices=DATASETS, default="criteo_kaggle",
                   help="split rule: criteo_kaggle/synthetic: seeded hash 8:1:1 train/val/test; "
                   "criteo_1tb: day_0..22 train, day_23 halved into val/test by the hash")
    p.add_argument("--min-count", type=int, default=1,
                   help="categorical values seen fewer times on the train split share the OOV id")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad row (exit 1, message names file, line, field) "
                   "instead of writing it to rejects.tsv")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all cores; under torchrun: cores / local ranks)")
    p.add_argument("--chunk-mb", type=int, default=64,
                   help="plain inputs are cut into chunks of about this many MiB (.gz files are one "
                   "chunk each); a chunk's rows of a split go to one parquet file, or to several "
                   "where --memory-mb cannot hold all their row groups' footers")
    p.add_argument("--row-group-rows", type=int, default=1_000_000,
                   help="rows per parquet row group (at most); pass 2 buffers one per split "
                   f"({SHARD_ROW_BYTES} B a row), so where --memory-mb cannot hold that, row groups "
                   "are smaller (said on stderr, recorded as row_group_rows in metadata.json; the "
                   "rows and ids are the same)")
    p.add_argument("--memory-mb", type=int, default=2048,
                   help="memory per process, the interpreter (~150 MiB) not included: read blocks "
                   "shrink, pass 1 spills a chunk's counts to disk in sorted runs, fields with many "
                   "distinct values are merged in key ranges, pass 2 looks values up in slices of "
                   "the memory-mapped vocabulary, caps its row groups and starts a new parquet file "
                   "per chunk and split before the open one's footer (~44 KiB a row group until the "
                   "file is closed) outgrows its share, so peak RSS grows neither with the input nor "
                   "with its distinct values; the rows and ids written, in their order, do not "
                   "depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output made with other options (else that is an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Optional[Sequence[str]], default_workers: int, prog: str = "dnis-preprocess") -> Options:
    a = parser(prog).parse_args(argv)
    for flag, value in (("--min-count", a.min_count), ("--chunk-mb", a.chunk_mb),
                        ("--row-group-rows", a.row_group_rows), ("--workers", a.workers or 1),
                        ("--memory-mb", a.memory_mb)):
        if value < 1:
            raise SystemExit(f"{prog}: error: {flag} must be >= 1, got {value}")
    return Options(tuple(a.inputs), a.output, a.dataset, a.min_count, a.seed, a.strict,
                   a.workers or default_workers, a.chunk_mb, a.row_group_rows, a.memory_mb,
                   a.overwrite, not a.no_progress)


def _json(value) -> object:
    return json.loads(json.dumps(value))


def _clear(out: Path) -> None:
    for entry in OUTPUT_ENTRIES:
        path = out / entry
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _sources(paths: Sequence[str]) -> list[dict]:
    return [{"path": os.path.abspath(p), "name": os.path.basename(p), "bytes": os.path.getsize(p),
             "mtime": os.path.getmtime(p)} for p in paths]


def finished(opts: Options) -> bool:
    """True when ``opts.output`` is a complete dataset made with equal options."""
    path = Path(opts.output) / METADATA_FILE
    return path.is_file() and DatasetMeta.load(opts.output).options == _json(opts.recorded())


def prepare(opts: Options) -> None:
    """Rank 0, first: check the output against the options; plan the chunks if new."""
    out = Path(opts.output)
    missing = [p for p in opts.inputs if not os.path.isfile(p)]
    if missing:
        raise PreprocessError(f"input not found: {', '.join(missing)}")
    check_sources(opts.dataset, [source_name(p) for p in opts.inputs])
    recorded = _json(opts.recorded())
    if (out / METADATA_FILE).is_file():
        if finished(opts):
            return
        if not opts.overwrite:
            old = DatasetMeta.load(out).options
            diff = {k: (old.get(k), v) for k, v in recorded.items() if old.get(k) != v}
            raise PreprocessError(f"{out} holds a finished dataset made with other options "
                                  f"(old, new): {diff}; pass --overwrite to replace it")
        _clear(out)
    plan_path = out / "_work" / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan["options"] == recorded and plan["sources"] == _json(_sources(opts.inputs)):
            return  # resume
        if not opts.overwrite:
            raise PreprocessError(f"{out} holds an unfinished run with other options or changed "
                                  "inputs; pass --overwrite to start over")
        _clear(out)
    for sub in ("counts", "rejects", "coded", "merge", "shards"):
        (out / "_work" / sub).mkdir(parents=True, exist_ok=True)
    chunks = plan_chunks(list(opts.inputs), opts.chunk_mb << 20)
    plan = {"options": recorded, "sources": _sources(opts.inputs), "chunks": [asdict(c) for c in chunks]}
    atomic_write_bytes(plan_path, json.dumps(plan, indent=1).encode())


def load_chunks(opts: Options) -> list[Chunk]:
    plan = json.loads((Path(opts.output) / "_work" / "plan.json").read_text())
    return [Chunk(**c) for c in plan["chunks"]]


def assign_chunks(chunks: list[Chunk], rank: int, world_size: int) -> list[Chunk]:
    """This rank's chunks: largest first to the least-loaded rank (deterministic)."""
    load = [0] * world_size
    owner = {}
    for chunk in sorted(chunks, key=lambda c: (-c.nbytes, c.id)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owner[chunk.id] = r
        load[r] += chunk.nbytes
    return [c for c in chunks if owner[c.id] == rank]


def count_chunks(chunks: list[Chunk], opts: Options, pool: WorkerPool, show: bool) -> None:
    """Pass 1 over the chunks not counted yet."""
    todo = [c for c in chunks if not counts_path(opts.context(), c).is_file()]
    pool.run(partial(count_chunk, ctx=opts.context()), todo, [c.nbytes for c in todo], "pass 1 (count)", show)


def write_chunks(chunks: list[Chunk], opts: Options, pool: WorkerPool, show: bool) -> None:
    """Pass 2 over the chunks without finished shards."""
    todo = [c for c in chunks if not shard_marker(opts.context(), c).is_file()]
    pool.run(partial(write_chunk, ctx=opts.context()), todo, [c.nbytes for c in todo], "pass 2 (write)", show)


def row_group_note(opts: Options) -> Optional[str]:
    """Why pass 2 writes smaller row groups than ``--row-group-rows`` asks, if it does.

    >>> print(row_group_note(Options(("x",), "out", memory_mb=256)))
    row groups of 79,137 rows, not 1,000,000: --memory-mb 256 buffers no more per split
    """
    rows = opts.context().row_group_rows
    if rows == opts.row_group_rows:
        return None
    return (f"row groups of {rows:,} rows, not {opts.row_group_rows:,}: --memory-mb {opts.memory_mb} "
            "buffers no more per split")


def sum_counts(chunks: list[Chunk], opts: Options, pool: WorkerPool, rank: int, world_size: int,
               show: bool) -> None:
    """Every rank: sum this rank's share of the (field, key range) merge tasks."""
    work = opts.context().work
    if (work / "merged.json").is_file():
        return
    ids = [c.id for c in chunks]
    tasks = plan_merge(work, ids, SPARSE_FIELDS + BUCKET_FIELDS, opts.budget_bytes // 2)
    todo = [t for t in tasks[rank::world_size] if not spill_path(work, t).is_file()]
    pool.run(partial(merge_range, work=work, chunk_ids=ids, min_count=opts.min_count), todo,
             [1] * len(todo), "merge counts", show)


def merge_counts(chunks: list[Chunk], opts: Options) -> None:
    """Rank 0, after ``sum_counts`` on every rank: rank the values, write vocab/ and rejects.tsv."""
    ctx, out = opts.context(), Path(opts.output)
    merged_path = ctx.work / "merged.json"
    if merged_path.is_file():
        return
    missing = np.zeros(len(SPARSE_FIELDS), np.int64)
    dense_counts = np.zeros(len(DENSE_FIELDS), np.int64)
    rows = np.zeros((len(SPLITS), 2), np.int64)
    lines, crcs = {}, {}
    for chunk in chunks:
        with np.load(counts_path(ctx, chunk)) as z:
            missing += z["missing"]
            dense_counts += z["dense_counts"]
            rows += z["rows"]
            lines[chunk.id] = int(z["lines"])
            crcs.setdefault(os.path.abspath(chunk.path), []).append(int(z["crc32"]))
    tasks = plan_merge(ctx.work, [c.id for c in chunks], SPARSE_FIELDS + BUCKET_FIELDS, opts.budget_bytes // 2)
    vocab = write_vocabulary(ctx.work, tasks, dict(zip(SPARSE_FIELDS, missing.tolist())), out / "vocab")
    _write_rejects(chunks, ctx, lines, out / "rejects.tsv")
    checksums = {p: hashlib.sha256(b"".join(c.to_bytes(4, "big") for c in v)).hexdigest()
                 for p, v in crcs.items()}
    merged = {"id_counts": vocab["id_counts"], "vocab_sizes": vocab["vocab_sizes"],
              "oov_ids": vocab["oov_ids"], "distinct_values": vocab["distinct_values"], "dense_counts": dict(zip(DENSE_FIELDS, dense_counts.tolist())),
              "rows": {s: {"read": int(r[0]), "rejected": int(r[1])} for s, r in zip(SPLITS, rows)},
              "checksums": checksums}
    atomic_write_bytes(merged_path, json.dumps(merged).encode())


def check_rows_kept(opts: Options) -> None:
    """Every rank, after the merge: an input with no rows is an error, not an empty dataset."""
    rows = json.loads((opts.context().work / "merged.json").read_text())["rows"]
    read = sum(r["read"] for r in rows.values())
    if read == sum(r["rejected"] for r in rows.values()):
        why = f"all {read} lines rejected (see {Path(opts.output) / 'rejects.tsv'})" if read else "no lines"
        raise PreprocessError(f"no rows in {', '.join(opts.inputs)}: {why}")


def _write_rejects(chunks: list[Chunk], ctx: ChunkContext, lines: dict, path: Path) -> None:
    """Concatenate the chunks' reject parts, turning chunk-local into file line numbers."""
    tmp = path.with_name(path.name + ".tmp")
    before: dict[str, int] = {}
    with open(tmp, "w") as f:
        f.write("file\tline\tfield\treason\trow\n")
        for chunk in chunks:
            offset = before.get(chunk.path, 0)
            # records are ASCII with the raw row escaped: b"\\n" ends each, nothing else does
            for rec in rejects_path(ctx, chunk).read_bytes().decode("ascii").split("\n")[:-1]:
                local, rest = rec.split("\t", 1)
                f.write(f"{chunk.path}\t{offset + int(local)}\t{rest}\n")
            before[chunk.path] = offset + lines[chunk.id]
    os.replace(tmp, path)


def finalize(chunks: list[Chunk], opts: Options) -> tuple[DatasetMeta, str]:
    """Rank 0, last: write ``metadata.json``, drop the work dir; returns the summary too."""
    ctx, out = opts.context(), Path(opts.output)
    merged = json.loads((ctx.work / "merged.json").read_text())
    plan = json.loads((ctx.work / "plan.json").read_text())
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    kept = dict.fromkeys(SPLITS, 0)
    row_group_rows = 0  # chunks written by resumed runs with other budgets may differ: the largest
    for chunk in chunks:
        marker = json.loads(shard_marker(ctx, chunk).read_text())
        row_group_rows = max(row_group_rows, marker["row_group_rows"])
        for split, n in marker["rows"].items():
            if "files" in marker:  # the chunk's files of the split in row order, with their rows
                files[split] += [name for name, _ in marker["files"][split]]
            elif n:  # a marker written before files had parts: one file per chunk and split
                files[split].append(f"{split}/{chunk.id}.parquet")
            kept[split] += n
    read = sum(r["read"] for r in merged["rows"].values())
    rejected = sum(r["rejected"] for r in merged["rows"].values())
    sources = [{**s, "checksum": merged["checksums"][s["path"]], "checksum_algo": CHECKSUM}
               for s in plan["sources"]]
    meta = DatasetMeta(
        dataset=opts.dataset, dense_fields=list(DENSE_FIELDS), sparse_fields=list(SPARSE_FIELDS),
        bucket_fields=list(BUCKET_FIELDS), vocab_sizes=merged["vocab_sizes"], oov_ids=merged["oov_ids"],
        id_counts=merged["id_counts"], dense_counts=merged["dense_counts"], min_count=opts.min_count,
        distinct_values=merged["distinct_values"],
        split=split_rule(opts.dataset, opts.seed),
        rows={"read": read, "kept": read - rejected, "rejected": rejected, **kept},
        files=files, sources=sources, versions=_versions(), options=_json(opts.recorded()),
        row_group_rows=row_group_rows,
    )
    if read - rejected != sum(kept.values()):
        raise PreprocessError(f"pass 2 wrote {sum(kept.values())} rows, pass 1 kept {read - rejected}")
    meta.save(out)
    shutil.rmtree(ctx.work, ignore_errors=True)
    return meta, summary(meta, merged["rows"])


def _versions() -> dict[str, str]:
    return {"pyarrow": pa.__version__, "numpy": np.__version__,
            "torchrec-dnis": importlib_metadata.version("torchrec-dnis"),
            "python": sys.version.split()[0]}


def summary(meta: DatasetMeta, per_split: Optional[dict] = None) -> str:
    """One line: rows read / kept / rejected, in all and (from pass 1) per split."""
    r = meta.rows
    line = f"rows read {r['read']}, kept {r['kept']}, rejected {r['rejected']}"
    if per_split is None:
        return line + "; kept per split: " + ", ".join(f"{s} {r[s]}" for s in SPLITS)
    parts = [f"{s} {c['read']}/{r[s]}/{c['rejected']}" for s, c in per_split.items()]
    return line + "; per split (read/kept/rejected): " + ", ".join(parts)


def run(opts: Options, rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None) -> DatasetMeta:
    """All stages; with ``world_size > 1`` every rank calls this with the job's barrier."""
    show = opts.progress and rank == 0
    if rank == 0:
        prepare(opts)
    barrier()
    if finished(opts):
        if rank == 0:
            meta = DatasetMeta.load(opts.output)
            print(f"dnis-preprocess: {opts.output} is already complete with these options; "
                  f"nothing to do ({summary(meta)})")
        return DatasetMeta.load(opts.output)
    chunks = load_chunks(opts)
    mine = assign_chunks(chunks, rank, world_size)
    with WorkerPool(opts.workers) as pool:
        count_chunks(mine, opts, pool, show)
        barrier()
        sum_counts(chunks, opts, pool, rank, world_size, show)
        barrier()
        if rank == 0:
            merge_counts(chunks, opts)
        barrier()
        check_rows_kept(opts)
        note = row_group_note(opts)
        if note and rank == 0:
            print(f"dnis-preprocess: {note}", file=sys.stderr)
        write_chunks(mine, opts, pool, show)
    barrier()
    if rank == 0:
        _, line = finalize(chunks, opts)
        print(f"dnis-preprocess: {opts.output}: {line}")
    barrier()
    return DatasetMeta.load(opts.output)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(argv, default_workers=os.cpu_count() or 1)
    try:
        run(opts)
    except (PreprocessError, ValueError) as err:
        raise SystemExit(f"dnis-preprocess: error: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
