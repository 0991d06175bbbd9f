"""The shipped model: a retrain run's checkpoint (written by 2 ranks) loads on 1 and 3
ranks and into one plain process (its tables on TorchRec's inference TBE) with identical
predictions; ``load_model`` scores raw TSV and parquet rows without any process group;
int8 and int4 stay within the bound their row ranges allow; bad raw rows fail naming
file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launch import predict
from pipeline.config import load_config
from pipeline.data import synth
from pipeline.data.loader import SplitReader
from pipeline.inference import RawInputError, load_model, read_artifact, read_tsv, serve_artifact
from launch_helpers import ROOT, finish, torchrun

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def raw_rows(tmp_path_factory) -> Path:
    """Fresh raw rows from the generator that made the dataset (labelled TSV)."""
    path = tmp_path_factory.mktemp("raw") / "rows.tsv"
    synth.main(["--rows", "300", "--seed", "11", "--out", str(path)])
    return path


def test_retrain_checkpoint_loads_on_any_world_size_and_in_one_plain_process(retrain_run, tmp_path):
    logits = {}
    for nproc in (1, 3):
        out = tmp_path / f"logits{nproc}.pt"
        finish(torchrun("tests.rank_logits", "--run-dir", str(retrain_run), "--out", str(out), nproc=nproc))
        logits[nproc] = torch.load(out)["logits"]
    model = load_model(retrain_run)
    data_path = load_config([retrain_run / "config.yaml"]).data.path
    reader = SplitReader(data_path, "test", model.layout, 128, shuffle=False, drop_last=False, prefetch=0)
    batch = next(iter(reader.batches()))
    with torch.no_grad():
        logits["plain"] = model.rank_logits(batch.dense, batch.sparse)
    assert not torch.distributed.is_initialized()
    for name in (3, "plain"):
        assert (logits[name] - logits[1]).abs().max() < 1e-5, name
    result = json.loads((retrain_run / "result.json").read_text())
    assert result["stage"] == "retrain" and result["compression_ratio"] >= 4 * 0.9


def test_predict_in_a_fresh_process_scores_tsv_parquet_and_unlabelled_rows_alike(retrain_run, raw_rows, tmp_path):
    expected = torch.cat([load_model(retrain_run).predict(block) for _, block in read_tsv(raw_rows)])
    assert expected.numel() == 300

    unlabelled = tmp_path / "unlabelled.tsv"
    unlabelled.write_text("".join(line.split("\t", 1)[1] for line in raw_rows.read_text().splitlines(True)))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(raw_table(raw_rows), parquet)
    for source, out in ((raw_rows, "a.parquet"), (unlabelled, "b.txt"), (parquet, "c.parquet")):
        args = ["--run-dir", str(retrain_run), "--input", str(source), "--out", str(tmp_path / out), "--no-progress"]
        if source == raw_rows:  # one run in a fresh process: no process group anywhere
            script = f"import torch.distributed as d; from launch.predict import main; main({args!r}); assert not d.is_initialized()"
            subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True)
        else:
            predict.main(args)
    scores = {
        "tsv": pq.read_table(tmp_path / "a.parquet").column("score").to_numpy(),
        "unlabelled": np.loadtxt(tmp_path / "b.txt"),
        "parquet": pq.read_table(tmp_path / "c.parquet").column("score").to_numpy(),
    }
    for name, got in scores.items():
        assert np.abs(got - expected.numpy()).max() < 1e-6, name


def raw_table(tsv: Path) -> pa.Table:
    """The raw rows as parquet columns: integers with nulls, hex strings with nulls."""
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    columns = {"label": pa.array([int(r[0]) for r in rows])}
    for j in range(13):
        columns[f"I{j + 1}"] = pa.array([int(r[1 + j]) if r[1 + j] else None for r in rows], pa.int64())
    for j in range(26):
        columns[f"C{j + 1}"] = pa.array([r[14 + j] or None for r in rows], pa.string())
    return pa.table(columns)


def test_bad_raw_rows_name_file_line_and_field_and_leave_no_output(retrain_run, raw_rows, tmp_path):
    lines = raw_rows.read_text().splitlines(True)
    fields = lines[2].split("\t")
    fields[14 + 4] = "xyz"  # C5 of line 3
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(lines[:2] + ["\t".join(fields)] + lines[3:]))
    with pytest.raises(RawInputError, match=rf"{bad}:3: field C5: not 8 hex chars"):
        list(read_tsv(bad))
    out = tmp_path / "scores.txt"
    with pytest.raises(SystemExit, match=rf"^dnis predict: {bad}:3: field C5: not 8 hex chars$"):
        predict.main(["--run-dir", str(retrain_run), "--input", str(bad), "--out", str(out), "--no-progress"])
    assert not out.exists() and not list(tmp_path.glob("scores.txt*"))


def test_dense_keys_folded_out_of_the_served_tables_score_as_the_unfolded_model(retrain_run, raw_rows):
    artifact = read_artifact(retrain_run / "model")
    folded, unfolded = serve_artifact(artifact), serve_artifact(artifact, fold=False)
    _, block = next(read_tsv(raw_rows))
    inputs = folded.encode(block)
    served, full = folded.features(*inputs), unfolded.features(*inputs)
    dense_slabs = [k for k in full.keys() if k.split(":")[0] in folded.layout.dense_keys]
    assert folded.ids_only and not unfolded.ids_only and dense_slabs
    assert served.keys() == [k for k in full.keys() if k not in dense_slabs] and served.weights_or_none() is None
    widths = [int(hi) - int(lo) for lo, hi in (k.split(":")[1].split("-") for k in dense_slabs)]
    assert folded.folded.dense_row_bytes == 4 * sum(widths)
    with torch.no_grad():
        got, expected = folded(*inputs), unfolded(*inputs)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_predictions_stay_within_the_bound_of_each_rows_range(retrain_run, raw_rows, bits):
    fp32, quantized = load_model(retrain_run), load_model(retrain_run, bits=bits)
    assert fp32.folded is not None and fp32.ids_only  # DeepFM: served folded, its dense keys' rows fp32
    _, block = next(read_tsv(raw_rows))
    dense, ids = fp32.encode(block)
    sparse = fp32.features(dense, ids)
    tables = served_tables(read_artifact(retrain_run / "model").weights, fp32.rewrite)  # fp32, as served
    bound = pooled_error_bound(tables, sparse, bits)  # [B, C]
    with torch.no_grad():
        pooled = fp32.model.embedding.ebc(sparse).values()
        diff = (pooled - quantized.model.embedding.ebc(sparse).values()).abs()
    assert (diff <= bound).all() and diff.max() > 0
    # Fewer bits, coarser steps: int4's error is well above int8's bound.
    assert bits == 8 or diff.max() > pooled_error_bound(tables, sparse, 8).max()

    # First order through the served interaction: |Δlogit| ≤ Σ |∂logit/∂pooled| · bound; σ' ≤ 1/4.
    pooled.requires_grad_(True)
    fp32.folded(dense, pooled).sum().backward()  # rows are independent
    logit_bound = (pooled.grad.abs() * bound).sum(1)
    with torch.no_grad():
        p_fp32, p_quantized = torch.sigmoid(fp32(dense, ids)), torch.sigmoid(quantized(dense, ids))
    assert ((p_fp32 - p_quantized).abs() <= 1.5 * logit_bound / 4 + 1e-6).all()


def served_tables(weights: dict, rows) -> dict[str, torch.Tensor]:
    """Slab -> its table as served: the artifact's rows in serving order and a zero row
    (``ServingRows.relay``)."""
    out = {}
    for name, source in rows.sources.items():
        table = weights[f"model.embedding.ebc.embedding_bags.t_{name}.weight"]
        out[name] = torch.cat([table[source], table.new_zeros(1, table.shape[1])])
    return out


def pooled_error_bound(tables, sparse, bits: int) -> torch.Tensor:
    """Per (row, pooled column) of the slab KJT ``sparse`` (one id per slab and row):
    half a quantization step of the id's slab row at ``bits`` plus fp16 rounding of the
    row's scale and bias; ``tables`` are the served fp32 slab tables."""
    columns = []
    for name, jt in sparse.to_dict().items():
        table = tables[name]
        low, high = table.min(1).values, table.max(1).values
        levels = 2**bits - 1
        step = (high - low) / levels
        per_row = step / 2 + levels * step * 2**-10 + low.abs() * 2**-10 + 1e-7
        columns.append(per_row[jt.values()][:, None].expand(-1, table.shape[1]))
    return torch.cat(columns, dim=1)

