"""Score raw Criteo rows (TSV, gzip or parquet) with an exported model, in one process.

    python -m launch.predict --run-dir runs/synthetic/search/retrain --input day_23.gz --out scores.tsv
    dnis predict --run-dir runs/synthetic/search/retrain --input rows.parquet --out scores.parquet --int8

Writes one probability per input row, in input order (``.parquet``: columns ``score``
and, when the input has labels, ``label``; otherwise one number per line), atomically:
a file at ``--out`` is always complete. With labels it also prints AUC and logloss.
The model is read from the artifact ``dnis export`` writes (a run directory stands for
its ``model/``), which nothing unpickles.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.evaluate import binary_metrics
from pipeline.inference import ArtifactError, RawInputError, load_model, read_raw
from pipeline.inference.raw import has_label
from pipeline.progress import progress_bar
from launch import run_as_process


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir", required=True,
        help="an exported model (dnis export), or a finished retrain or train run holding one in model/",
    )
    parser.add_argument("--input", required=True, help="raw rows: TSV (40 or 39 fields, .gz ok) or .parquet")
    parser.add_argument("--out", required=True, help="scores: .parquet, or text (one per line)")
    parser.add_argument("--int8", action="store_true", help="row-wise int8 tables (quantize_inference_model)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def score(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels)`` of every input row, in order."""
    model = load_model(args.run_dir, 8 if args.int8 else None)
    scores, labels = [], []
    with progress_bar(desc="predict", unit="row", disable=args.no_progress) as bar:
        for _, block in read_raw(args.input):
            scores.append(model.predict(block).numpy())
            labels.append(block.label)
            bar.update(len(block.label))
    return np.concatenate(scores), np.concatenate(labels)


def write_scores(path: Path, scores: np.ndarray, labels: Optional[np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        columns = {"score": scores} if labels is None else {"score": scores, "label": labels}
        pq.write_table(pa.table(columns), tmp)
    else:
        np.savetxt(tmp, scores, fmt="%.7g")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Score ``--input``; a row that cannot be scored exits 1 with ``path:line: field F: reason``,
    a missing, changed or malformed model file with ``path: reason``."""
    args = parse_args(argv)
    try:
        labelled = _labelled(args.input)  # before the model loads: bad input fails fast
        scores, labels = score(args)
    except (RawInputError, ArtifactError) as err:
        raise SystemExit(f"dnis predict: {err}") from None
    except pa.ArrowInvalid as err:  # not a parquet file, or a broken one
        raise SystemExit(f"dnis predict: {args.input}: {err}") from None
    write_scores(Path(args.out), scores, labels if labelled else None)
    result = {"rows": int(scores.size)}
    if labelled:  # rows with a null label (parquet) are scored but not counted
        known = labels >= 0
        result.update(binary_metrics(torch.from_numpy(scores[known]), torch.from_numpy(labels[known])))
        print(f"auc {result['auc']:.5f} logloss {result['logloss']:.5f} rows {result['rows']}")
    print(f"wrote {scores.size} scores to {args.out}")
    return result


def _labelled(path: str) -> bool:
    if path.endswith(".parquet"):
        return "label" in pq.ParquetFile(path).schema_arrow.names
    return has_label(path)


if __name__ == "__main__":
    run_as_process(main)
