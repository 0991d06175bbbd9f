"""The Criteo Terabyte layout end to end at CI scale: 24 gzip days through the
``preprocess`` TorchX component on 2 ranks (``--dataset criteo_1tb``), the loader on
every split, and a short 2-rank search on ``configs/criteo_1tb.yaml`` shrunk by overrides."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from launch_helpers import ROOT, finish, preprocess_component, torchrun
from pipeline.config import load_config
from pipeline.data import synth
from pipeline.data.features import FeatureLayout
from pipeline.data.loader import SplitReader
from pipeline.data.metadata import DatasetMeta
from pipeline.data.schema import SPLITS

DAYS, ROWS_PER_DAY = 24, 400
# At 0.05 the widest synthetic vocabularies hold ~10k values, so C3, C12, C16, C21 ... keep
# ~2.3k ids each on 9.2k train rows: mostly ids seen once, the tail Terabyte tables have.
VOCAB_SCALE = 0.05
TAIL_RATE = 0.5  # C1's heavy tail: half its rows take values seen about once (benchmarks/terabyte_e2e.py: 5M)
CONFIG_1TB = ROOT / "configs" / "criteo_1tb.yaml"


@pytest.fixture(scope="module")
def terabyte(tmp_path_factory) -> tuple[Path, Path]:
    """(raw day files directory, dataset preprocessed by the 2-rank TorchX component)."""
    root = tmp_path_factory.mktemp("terabyte")
    synth.main([
        "--rows", str(DAYS * ROWS_PER_DAY), "--days", str(DAYS), "--gzip",
        "--vocab-scale", str(VOCAB_SCALE), "--tail-field", "C1", "--tail-rate", str(TAIL_RATE),
        "--out", str(root / "raw"),
    ])
    days = [str(root / "raw" / f"day_{d}.gz") for d in range(DAYS)]
    preprocess_component(root / "data", days, dataset="criteo_1tb")
    return root / "raw", root / "data"


def _day_rows(raw: Path, day: int) -> int:
    with gzip.open(raw / f"day_{day}.gz", "rb") as f:
        return sum(1 for _ in f)


def _source_days(files: list[str]) -> set[str]:
    return {Path(f).name.split(".")[0] for f in files}


@pytest.mark.multirank
def test_days_0_to_22_train_and_day_23_alone_splits_into_val_and_test(terabyte):
    raw, data = terabyte
    meta = DatasetMeta.load(data)
    assert meta.dataset == "criteo_1tb" and meta.rows["rejected"] == 0
    assert meta.rows["train"] == sum(_day_rows(raw, d) for d in range(DAYS - 1))
    assert meta.rows["val"] + meta.rows["test"] == _day_rows(raw, DAYS - 1)
    assert meta.rows["val"] > 0 and meta.rows["test"] > 0
    assert _source_days(meta.files["train"]) == {f"day_{d}" for d in range(DAYS - 1)}
    assert _source_days(meta.files["val"]) == _source_days(meta.files["test"]) == {"day_23"}
    # the heavy tail is there: C1 has a distinct value for nearly every other train row
    assert meta.distinct_values["C1"] == meta.vocab_sizes["C1"] - 1 > 0.45 * meta.rows["train"]


@pytest.mark.multirank
def test_loader_reads_a_batch_of_every_split_in_the_configs_dense_mode(terabyte):
    _, data = terabyte
    meta = DatasetMeta.load(data)
    layout = FeatureLayout.from_meta(meta, load_config([CONFIG_1TB]).data.dense_mode)
    for split in SPLITS:
        reader = SplitReader(data, split, layout, batch_size=64, shuffle=False, drop_last=False, prefetch=0)
        batch = next(iter(reader.batches()))
        assert batch.dense.shape == (64, layout.num_dense), split
        assert tuple(batch.sparse.keys()) == layout.keys == tuple(meta.sparse_fields), split
        assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}, split  # 64 < rows: no padding
        for key, ids in batch.sparse.to_dict().items():
            assert ids.lengths().eq(1).all() and 0 <= ids.values().min(), (split, key)
            assert ids.values().max() < meta.vocab_sizes[key], (split, key)


@pytest.mark.multirank
def test_search_on_the_1tb_config_uses_the_datasets_vocab_and_writes_alpha(terabyte, tmp_path):
    _, data = terabyte
    run_dir = tmp_path / "search"
    overrides = [
        f"data.path={data}", f"run.dir={run_dir}", "data.batch_size=64", "data.eval_batch_size=256",
        "search.val_batch_size=32", "train.max_steps=6", "train.eval_every=3",
        "train.checkpoint_every=3", "train.log_every=3", "train.eval_max_batches=2",
    ]
    out = finish(torchrun(
        "launch.search", "--config", str(CONFIG_1TB), *(a for o in overrides for a in ("--set", o)),
        "--no-progress",
    ))
    assert "test auc" in out
    cfg = load_config([CONFIG_1TB], overrides)
    assert cfg.model.name == "dcnv2" and cfg.data.table_sizes  # the config's own, not shrunk
    alpha = torch.load(run_dir / "alpha.pt")
    assert alpha.shape == (cfg.blocking.num_blocks, cfg.model.embedding_dim)
    meta = DatasetMeta.load(data)
    # the blocked ids are the dataset's tables, not data.table_sizes (4 x 40M rows alone)
    blocked = sum(json.loads((run_dir / "blocking.json").read_text())["block_features"])
    assert blocked == sum(meta.vocab_sizes[f] for f in meta.sparse_fields) != sum(cfg.data.table_sizes)
    test = json.loads((run_dir / "result.json").read_text())["test"]
    assert test["rows"] == meta.rows["test"] and 0 <= test["auc"] <= 1
