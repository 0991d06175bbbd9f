"""Post-training quantisation (``dnis quantize``): the bytes formula matches what FBGEMM
allocates; a train run and a repacked retrain run quantize to INT8 and INT4 in one
process, with the compression ratio the formula gives and test metrics near fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from launch import cli
from pipeline.config import load_config
from pipeline.inference import inference_tables
from plans.bytes import quantized_table_bytes
from plans.structured import Group, GroupPlan, StructuredPlan

pytestmark = pytest.mark.multirank  # the run fixtures spawn ranks


def test_quantized_bytes_by_hand_and_as_fbgemm_allocates_them():
    # INT8 width 16: 16 values + fp16 scale and bias = 20 B a row; 10 rows = 200 B, one 256 B cache-line block.
    assert quantized_table_bytes(rows=10, width=16, bits=8) == 256
    # INT4 width 16: 8 B of nibbles + 4 = 12 B a row; 100 rows = 1200 B -> 1280.
    assert quantized_table_bytes(rows=100, width=16, bits=4) == 1280
    assert quantized_table_bytes(rows=100, width=0, bits=4) == 0  # a dropped group has no table
    plan = StructuredPlan(
        (GroupPlan(Group("a", 0, 0, 2), (1, 3, 4, 6)), GroupPlan(Group("a", 1, 2, 10), ())),
        embedding_dim=8, tau=0.5,
    )
    # range starts 8 + 8, 4 one-byte column indices, one INT4 table: 2 rows × (2 + 4) B -> 128
    assert plan.embedding_bytes("selection", bits=4) == 8 + 8 + 4 + 128
    assert plan.compression_ratio("selection", bits=8) == pytest.approx(320 / (8 + 8 + 4 + 128))

    # INT8 keeps width 1 fp32 (4 B a row, not 1 + 4), INT4 widths 1, 2 and 6: 200 rows × 4 B -> 896.
    assert quantized_table_bytes(rows=200, width=1, bits=8) == 896
    widths, rows = [1, 2, 4, 6, 8, 12, 16, 32], [100, 37, 101, 5, 3, 40, 7, 9]
    for bits in (8, 4):
        configs = [
            EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=w, feature_names=[f"f{i}"])
            for i, (w, n) in enumerate(zip(widths, rows))
        ]
        quantized = inference_tables(nn.Sequential(EmbeddingBagCollection(configs)), bits)
        allocated = sum(
            m.weights_host.numel() for m in quantized.modules()
            if isinstance(m, IntNBitTableBatchedEmbeddingBagsCodegen)
        )
        assert allocated == quantized_table_bytes(rows, widths, bits).sum(), bits


@pytest.mark.parametrize("bits", [8, 4])
def test_a_repacked_plans_quantized_bytes_are_what_fbgemm_allocates_for_its_slabs(bits):
    from sharding.repack import RepackedEmbedding
    from test_repack import NUMS, searched, with_shared_rows

    _, plan = searched(seed=4)
    plan = with_shared_rows(plan)
    module = RepackedEmbedding(plan, list(NUMS))
    assert len(module.ebc.embedding_bag_configs()) > len(NUMS)  # rows split over several slabs
    quantized = inference_tables(nn.Sequential(module), bits)
    allocated = sum(m.weights_host.numel() for m in quantized.modules()
                    if isinstance(m, IntNBitTableBatchedEmbeddingBagsCodegen))
    starts_and_projections = plan.embedding_bytes("selection") - sum(g.stored_rows * g.width * 4 for g in plan.groups)
    assert plan.embedding_bytes("selection", bits) == allocated + starts_and_projections


def test_tables_fbgemm_cannot_quantize_keep_their_exact_fp32_rows():
    # A repacked plan's width-1 slabs at INT8, width 6 at INT4: fp32 rows in the same kernel.
    widths = [1, 6, 8]
    ids = torch.tensor([3, 0, 4])
    features = KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(3)], ids, torch.ones(3, dtype=torch.int32))
    for bits, exact in ((8, [True, False, False]), (4, [True, True, False])):
        torch.manual_seed(bits)
        ebc = EmbeddingBagCollection([
            EmbeddingBagConfig(name=f"t{i}", num_embeddings=5, embedding_dim=w, feature_names=[f"f{i}"])
            for i, w in enumerate(widths)
        ])
        want = ebc(features).to_dict()
        got = inference_tables(nn.Sequential(ebc), bits)[0](features).to_dict()
        for (key, value), kept in zip(want.items(), exact):
            error = (got[key] - value).abs().max()
            assert (error == 0) == kept, (bits, key, error)
            assert error < 0.02, (bits, key, error)  # the quantized ones: within a step of their rows' range


def quantize(run: Path, bits: int) -> dict:
    cli.main(["quantize", "--run-dir", str(run), "--bits", str(bits), "--no-progress"])
    assert not torch.distributed.is_initialized()
    return json.loads((run / f"quantized_int{bits}.json").read_text())


def test_train_run_quantizes_to_int8_and_int4_near_its_fp32_test_metrics(train_run):
    fp32 = json.loads((train_run / "result.json").read_text())["test"]
    results = {bits: quantize(train_run, bits) for bits in (8, 4)}
    k = load_config([train_run / "config.yaml"]).model.embedding_dim
    for bits, result in results.items():
        assert result["test"]["rows"] == fp32["rows"] and result["bits"] == bits
        assert result["unpruned_bytes"] / result["embedding_bytes"] == result["compression_ratio"]
        # Per row: 4K fp32 bytes against K·bits/8 + 4 (each table's cache-line padding costs a little).
        per_row = 4 * k / (k * bits / 8 + 4)
        assert 0.9 * per_row <= result["compression_ratio"] <= per_row
    gaps = {bits: abs(r["test"]["logloss"] - fp32["logloss"]) for bits, r in results.items()}
    assert abs(results[8]["test"]["auc"] - fp32["auc"]) < 0.005 and gaps[8] < 0.002
    assert abs(results[4]["test"]["auc"] - fp32["auc"]) < 0.03 and gaps[4] < 0.02
    assert gaps[8] < gaps[4]


def test_repacked_retrain_run_compounds_pruning_and_quantisation(retrain_run):
    retrained = json.loads((retrain_run / "result.json").read_text())
    pruned = json.loads((retrain_run / "prune.json").read_text())
    plan = StructuredPlan.from_json(pruned["plan"])
    for bits in (8, 4):
        result = quantize(retrain_run, bits)
        assert result["source"] == "retrain" and result["unpruned_bytes"] == pruned["unpruned_bytes"]
        assert result["compression_ratio"] == pytest.approx(plan.compression_ratio(pruned["projection"], bits))
        # Roughly the prune CR times the per-row factor of its widths (range starts,
        # column indices and cache-line padding make the quantized part a little dearer).
        kept = [(g.group.rows, g.width) for g in plan.groups if g.width]
        factor = sum(n * 4 * w for n, w in kept) / sum(n * (w * bits / 8 + 4) for n, w in kept)
        assert 0.5 < result["compression_ratio"] / (retrained["compression_ratio"] * factor) <= 1.0
        # The loader's ranks reach the served (re-laid) tables through their serving ids:
        # int8 moves the metrics by its rounding only.
        gaps = {m: abs(result["test"][m] - retrained["test"][m]) for m in ("auc", "logloss")}
        assert gaps["auc"] < (0.002 if bits == 8 else 0.03) and gaps["logloss"] < (0.001 if bits == 8 else 0.01), gaps
        assert result["test"]["rows"] == retrained["test"]["rows"]


def test_a_search_run_is_refused(search_run):
    with pytest.raises(SystemExit, match="a search run"):
        cli.main(["quantize", "--run-dir", str(search_run), "--bits", "8", "--no-progress"])
