"""MLPerf's multi-hot variant (``data.multi_hot_sizes``): the loader's bags are one per id,
the same in every split, stage and rank; counts count lookups; a 2-rank search gives
the unsharded α-EBC's outputs; search -> prune -> retrain runs, and serving refuses it."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from torchrec.distributed.planner.types import ParameterConstraints

from data_fixtures import read_split, write_dataset
from launch_helpers import ROOT, TINY, finish, search_args, torchrun
from pipeline.config import ConfigError, load_config
from pipeline.data.features import FeatureLayout
from pipeline.data.loader import SplitReader, search_batches
from pipeline.data.metadata import DatasetMeta, decode_counts, encode_counts
from pipeline.data.schema import SPARSE_FIELDS
from pipeline.search.blocking import compute_blocking
from pipeline.tasks import build_search_task, qr_plan
from sharding.alpha_ebc import split_multi_hot
from sharding.checkpoint import load_full_state
from sharding.dmp import shard_model
from sharding.local_ranks import run_ranks

# MLPerf DLRM-DCNv2's sizes (C21: 100 ids a row); sizes of 1 stay single-hot.
MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
SIZES = [3, 1, 2] + [1] * 22 + [5]
SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The loader fixture's dataset, whose multi-hot fields' metadata holds their true
    train counts by id (the fixture's ids are no frequency ranks; expanding needs neither)."""
    path = tmp_path_factory.mktemp("multi_hot")
    meta = write_dataset(path)
    train = read_split(path, "train")
    counts = {key: encode_counts(np.bincount(train[key], minlength=meta.vocab_sizes[key]))
              for key, size in zip(SPARSE_FIELDS, SIZES) if size > 1}
    meta = replace(meta, id_counts={**meta.id_counts, **counts})
    meta.save(path)
    return path, meta


def layout_of(meta, distribution="uniform", sizes=SIZES, mode="embedding"):
    return FeatureLayout.from_meta(meta, mode, sizes, distribution)


@pytest.mark.parametrize("distribution", ["uniform", "pareto"])
def test_every_split_and_rank_reads_one_bag_per_id_and_counts_are_its_lookups(data, distribution):
    path, meta = data
    layout = layout_of(meta, distribution)
    again = layout_of(meta, distribution)  # another stage or rank builds its own
    assert layout.multi_hot_keys == ("C1", "C3", "C26")
    sizes = dict(zip(SPARSE_FIELDS, SIZES))
    for key in layout.multi_hot_keys:
        every_id = torch.arange(layout.num_embeddings[key])
        bags = layout.multi_hot.bags(key, every_id)
        assert bags.shape == (every_id.numel(), sizes[key]) and torch.equal(bags, again.multi_hot.bags(key, every_id))
        assert torch.equal(bags[:, 0].sort().values, every_id)  # relabelling permutes the rows
    source = {split: read_split(path, split) for split in ("train", "val", "test")}
    row_ids = {split: {int(uid): i for i, uid in enumerate(cols["I1"])} for split, cols in source.items()}
    seen: dict[tuple[str, int], list[int]] = {}
    lookups = {key: np.zeros(layout.num_embeddings[key], np.int64) for key in layout.multi_hot_keys}
    for split, cols in source.items():
        for rank in range(2):
            reader = SplitReader(path, split, layout, 16, rank=rank, world_size=2, drop_last=False, prefetch=0)
            for batch in reader.batches():
                real = batch.labels >= 0
                rows = [row_ids[split][int(u)] for u in batch.dense[real, 0].tolist()]
                per_key = batch.sparse.to_dict()
                for key, size in sizes.items():
                    bags = per_key[key].values().view(-1, size)[real]
                    assert (per_key[key].weights() == 1).all()
                    for row, bag in zip(rows, bags.tolist()):
                        raw = int(cols[key][row])
                        if size == 1:
                            assert bag == [raw]  # single-hot fields are read as they are
                        assert seen.setdefault((key, raw), bag) == bag, (split, rank, key, raw)
                        if split == "train" and size > 1:
                            np.add.at(lookups[key], bag, 1)
    for key in layout.multi_hot_keys:  # train lookups per new id, non-increasing: frequency ranks
        assert np.array_equal(decode_counts(layout.counts[key]), lookups[key])
    blocking = compute_blocking(layout.counts, 4)
    assert sum(blocking.block_mass) == sum(meta.dense_counts.values()) + 500 * sum(SIZES)


def test_multi_hot_sizes_must_give_one_size_of_at_least_1_per_categorical_field(data, tmp_path):
    meta = data[1]
    with pytest.raises(ConfigError, match=r"data\.multi_hot_sizes: 3 sizes for the 26 categorical fields"):
        layout_of(meta, sizes=[3, 2, 1])
    with pytest.raises(ConfigError, match=r"data\.multi_hot_sizes must all be >= 1"):
        load_config([TINY], ["data.multi_hot_sizes=[2, 0]"])
    with pytest.raises(ConfigError, match=r"data\.multi_hot_distribution 'zipf'"):
        load_config([TINY], ["data.multi_hot_distribution=zipf"])
    assert layout_of(meta, sizes=[1] * 26).multi_hot is None  # all 1: single-hot
    cfg = load_config([TINY], ["model.embedding=qr", "model.qr_target_cr=2", "model.qr_min_rows=10"])
    with pytest.raises(ConfigError, match=r"model\.embedding=qr needs single-hot.*\['C1', 'C3', 'C26'\]"):
        qr_plan(cfg, layout_of(meta))


def test_criteo_1tb_yaml_turns_mlperfs_sizes_on_by_uncommenting_its_line(tmp_path):
    configs = ROOT / "configs"
    text = (configs / "criteo_1tb.yaml").read_text()
    assert load_config([configs / "criteo_1tb.yaml"]).data.multi_hot_sizes == ()  # off as shipped
    on = tmp_path / "criteo_1tb.yaml"
    on.write_text(text.replace("  # multi_hot_sizes:", "  multi_hot_sizes:")
                  .replace("extends: base.yaml", f"extends: {configs / 'base.yaml'}"))
    assert list(load_config([on]).data.multi_hot_sizes) == MLPERF_SIZES and len(MLPERF_SIZES) == len(SPARSE_FIELDS)


def sharded_search_outputs(env, data_dir: str) -> dict:
    """One search step's outputs on this rank's loader batch: unsharded, and sharded each
    way TorchRec shards on CPU (max |difference|); and this rank's bags of C26."""
    cfg = load_config([TINY], [f"data.path={data_dir}", f"data.multi_hot_sizes={SIZES}", "data.batch_size=16",
                               "search.val_batch_size=8"])
    layout = FeatureLayout.from_config(DatasetMeta.load(data_dir), cfg.data)
    blocking = compute_blocking(layout.counts, cfg.blocking.num_blocks, cfg.blocking.mode)
    split = partial(split_multi_hot, blocking=blocking, multi_hot=layout.multi_hot_keys)
    train, val = (SplitReader(data_dir, s, layout, n, rank=env.rank, world_size=env.world_size, prefetch=0,
                              transform=split) for s, n in (("train", 16), ("val", 8)))
    batch = next(search_batches(train, val, 1, epoch=0, start=0, global_step=0))
    torch.manual_seed(0)
    full = build_search_task(cfg, layout, blocking, torch.device("cpu"))
    full.model.embedding.alpha.data = torch.rand(full.model.embedding.alpha.shape)
    full.train()
    _, expected = full(batch)
    diffs = {}
    for kind in SHARDING_TYPES:
        task = build_search_task(cfg, layout, blocking, torch.device("meta"))
        constraints = {c.name: ParameterConstraints(sharding_types=[kind], min_partition=4)
                       for c in task.model.embedding.ebc.embedding_bag_configs()}
        dmp = shard_model(task, env, "rowwise_adagrad", 0.01, constraints)
        load_full_state(dmp, full.state_dict())
        dmp.train()
        _, out = dmp(batch)
        diffs[kind] = {name: (out[name] - expected[name]).abs().max().item()
                       for name in ("logits", "val_loss", "grad_alpha")}
    return {"diffs": diffs, "bags": layout.multi_hot.bags("C26", torch.arange(layout.num_embeddings["C26"]))}


@pytest.mark.multirank
def test_a_multi_hot_search_step_on_two_ranks_equals_the_unsharded_alpha_ebc(data):
    results = run_ranks(sharded_search_outputs, 2, str(data[0]))
    for rank, result in enumerate(results):
        for kind, diffs in result["diffs"].items():
            assert max(diffs.values()) < 1e-5, (rank, kind, diffs)
    assert torch.equal(results[0]["bags"], results[1]["bags"])  # every rank draws the same bags


@pytest.mark.multirank
def test_multi_hot_search_prune_retrain_runs_and_serving_refuses_it(dataset, tmp_path):
    from launch import export
    from pipeline.inference import ArtifactError, load_model

    search = tmp_path / "search"
    sizes = f"data.multi_hot_sizes={MLPERF_SIZES}"
    finish(torchrun("launch.search", *search_args(dataset, search, "--set", sizes, "--set", "train.max_steps=12")))
    finish(torchrun("launch.prune", "--run-dir", str(search), "--cr", "4", nproc=1))
    retrain = tmp_path / "retrain"
    out = finish(torchrun(
        "launch.retrain", "--run-dir", str(search), "--out", str(retrain),
        "--set", "train.max_steps=4", "--set", "train.eval_every=4", "--no-progress", nproc=1,
    ))
    assert "not exported: data.multi_hot_sizes is on" in out and not (retrain / "model").exists()
    result = json.loads((retrain / "result.json").read_text())
    assert result["test"]["rows"] > 0 and result["compression_ratio"] >= 4
    with pytest.raises(SystemExit, match=r"dnis export: .*data\.multi_hot_sizes is on"):
        export.main(["--run-dir", str(retrain)])
    with pytest.raises(ArtifactError, match=r"data\.multi_hot_sizes is on"):
        load_model(retrain)
