"""The repacked column-slab tables give exactly the outputs of the structurally pruned
α-model (the fixed selection, and the learned projection before it trains): unsharded,
and sharded by TorchRec on 2 CPU ranks table-, column-, table-column-wise and data
parallel; the column statistics the plan needs are the same read from any sharding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.prune.plan import group_ranges
from pipeline.search.blocking import compute_blocking
from plans.structured import GroupPlan, StructuredPlan
from sharding.alpha_ebc import AlphaEmbeddingBagCollection, split_multi_hot
from sharding.checkpoint import load_full_state
from sharding.field_embedding import table_configs
from sharding.kjt import single_hot_kjt
from sharding.local_ranks import run_ranks
from sharding.repack import (
    PROJECTIONS, RepackedEmbedding, KeyRewriter, SingleHotKeyRewriter,
    load_repacked_weights, repacked_weights,
)
from sharding.table_stats import group_gram, group_sum_sq

K, L = 8, 3
META = torch.device("meta")
SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
NUMS = {"a": 60, "b": 17, "c": 5}


def skewed_blocking():
    counts = {k: [[100 // (i + 1) + 1, 1] for i in range(n)] for k, n in NUMS.items()}
    return compute_blocking(counts, L, mode="equal_count")


def searched(seed: int = 0):
    """A small α-EBC with random tables and α, and a nested plan: per feature a random
    column order, per group a random width in {0, 4, 8} keeping its prefix."""
    torch.manual_seed(seed)
    blocking = skewed_blocking()
    ebc = EmbeddingBagCollection(table_configs(NUMS, K, 0.5))
    alpha_ebc = AlphaEmbeddingBagCollection(ebc, blocking)
    alpha_ebc.alpha.data = torch.rand(L, K)
    g = torch.Generator().manual_seed(seed)
    order = {key: torch.randperm(K, generator=g).tolist() for key in NUMS}
    plan = StructuredPlan(
        tuple(
            GroupPlan(group, tuple(sorted(order[group.key][: 4 * int(torch.randint(0, 3, (1,), generator=g))])))
            for group in group_ranges(blocking, NUMS, ranges_per_block=2)
        ),
        embedding_dim=K, tau=0.0,
    )
    return alpha_ebc, plan


def structured_reference(alpha_ebc, plan, ids: torch.Tensor) -> torch.Tensor:
    """The α-model's output with every column outside its group's kept set zeroed."""
    out = alpha_ebc(single_hot_kjt(list(NUMS), ids))
    mask = torch.zeros_like(out)
    for f, key in enumerate(NUMS):
        for g in plan.groups:
            if g.group.key != key:
                continue
            rows = (ids[f] >= g.group.start) & (ids[f] < g.group.stop)
            for col in g.columns:
                mask[rows, f, col] = 1.0
    return out * mask


def build_repacked(alpha_ebc, plan, projection="selection", weighted=False):
    tables = {k: alpha_ebc.ebc.embedding_bags[f"t_{k}"].weight.detach() for k in NUMS}
    module = RepackedEmbedding(plan, list(NUMS), projection, weighted)
    load_repacked_weights(module, repacked_weights(plan, list(NUMS), tables, alpha_ebc.alpha.detach()))
    return module


def random_ids(seed: int, rows: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (rows,), generator=g) for n in NUMS.values()])


def test_selection_projection_equals_the_structured_alpha_model():
    alpha_ebc, plan = searched()
    assert any(g.width == 0 for g in plan.groups) and any(g.width == K for g in plan.groups)
    module = build_repacked(alpha_ebc, plan)
    assert all(c.embedding_dim % 4 == 0 for c in module.ebc.embedding_bag_configs())
    for seed in range(3):
        ids = random_ids(seed)
        expected = structured_reference(alpha_ebc, plan, ids)
        got = module(KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), ids)))
        assert (got - expected).abs().max() < 1e-6


MULTI = ("a", "b")  # the multi-hot features of the multi-hot case ("c" stays single-hot)


def multi_hot_batch(seed: int, rows: int = 32) -> KeyedJaggedTensor:
    """Bags of 0-4 ids of ``MULTI`` features, one id of the others, keys in ``NUMS`` order."""
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(0, 5, (rows,), generator=g) if k in MULTI else torch.ones(rows, dtype=torch.int64)
               for k in NUMS]
    values = [torch.randint(0, n, (int(length.sum()),), generator=g) for n, length in zip(NUMS.values(), lengths)]
    return KeyedJaggedTensor.from_lengths_sync(list(NUMS), torch.cat(values), torch.cat(lengths))


def structurally_pruned(alpha_ebc, plan):
    """The multi-hot α-model (``MULTI`` split per block) holding ``alpha_ebc``'s α and
    tables, each table's columns outside its groups' kept ones zeroed."""
    blocking = skewed_blocking()
    pruned = AlphaEmbeddingBagCollection(
        EmbeddingBagCollection(table_configs(NUMS, K, 0.5, MULTI, L)), blocking, MULTI)
    pruned.alpha.data = alpha_ebc.alpha.detach().clone()
    with torch.no_grad():
        for key in NUMS:
            pruned.ebc.embedding_bags[f"t_{key}"].weight.copy_(alpha_ebc.ebc.embedding_bags[f"t_{key}"].weight)
        for g in plan.groups:
            dropped = [c for c in range(K) if c not in g.columns]
            pruned.ebc.embedding_bags[f"t_{g.group.key}"].weight[g.group.start : g.group.stop, dropped] = 0.0
    return lambda kjt: pruned(split_multi_hot(kjt, blocking, MULTI))


def test_selection_projection_equals_the_structured_alpha_model_on_multi_hot_bags():
    alpha_ebc, plan = searched(seed=8)
    assert any(g.width == 0 for g in plan.groups) and any(0 < g.width < K for g in plan.groups)
    module, reference = build_repacked(alpha_ebc, plan), structurally_pruned(alpha_ebc, plan)
    for seed in range(3):
        kjt = multi_hot_batch(seed)
        got = module(KeyRewriter(plan, list(NUMS))(kjt))
        assert (got - reference(kjt)).abs().max() < 1e-6


def test_slabs_store_each_kept_value_once_in_one_key_per_distinct_width_of_a_feature():
    _, plan = searched(seed=5)
    module = RepackedEmbedding(plan, list(NUMS))
    configs = module.ebc.embedding_bag_configs()
    for key in NUMS:
        widths = {g.width for g in plan.groups if g.group.key == key} - {0}
        mine = [c for c in configs if c.feature_names[0].startswith(f"{key}:")]
        assert len(mine) == len(widths) and sum(c.embedding_dim for c in mine) == max(widths, default=0)
    assert sum(c.num_embeddings * c.embedding_dim for c in configs) == sum(g.group.rows * g.width for g in plan.groups)
    padded = StructuredPlan((GroupPlan(plan.groups[0].group, (0, 1)),), K, 0.0)  # 2 columns stored at width 4
    with pytest.raises(ValueError, match="keeps 2 columns at width 4"):
        RepackedEmbedding(padded, list(NUMS))


def test_learned_projections_have_the_strides_ddp_buckets_expect():
    """A one-column feature's [1, K] projection built as a transposed slice has strides
    (1, 1); DDP's bucket view copies them and warned on every retraining step."""
    from sharding.repack import projection_init

    for order in ([2], [2, 0]):
        for rotation in (None, torch.randn(3, 3)):
            assert projection_init(order, 3, rotation).stride() == (3, 1)


def test_learned_projection_starts_at_the_selection_and_trains():
    alpha_ebc, plan = searched(seed=1)
    fixed, learned = build_repacked(alpha_ebc, plan), build_repacked(alpha_ebc, plan, "learned")
    kjt = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), random_ids(7)))
    assert torch.equal(fixed(kjt), learned(kjt))
    assert all(p.requires_grad for p in learned.projections.values())
    assert len(fixed.projections) == 0  # the selection is an index, nothing to train


def test_both_projections_trace_with_the_tables_as_leaves_as_the_train_pipeline_does():
    """TorchRec's train pipeline FX-traces the model around its sharded tables: the
    projections must trace, with the pooled keys' order read at run time, also when a
    feature keeps nothing."""
    from torchrec.fx import Tracer

    alpha_ebc, plan = searched(seed=2)
    plan = StructuredPlan(tuple(g if g.group.key != "c" else GroupPlan(g.group, ()) for g in plan.groups), K, 0.0)
    kjt = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), random_ids(9)))
    for projection in PROJECTIONS:
        module = Probe(build_repacked(alpha_ebc, plan, projection))
        traced = torch.fx.GraphModule(module, Tracer(leaf_modules=["EmbeddingBagCollection"]).trace(module))
        assert torch.equal(traced(kjt), module(kjt)) and not module(kjt)[:, 2].any(), projection


class Probe(torch.nn.Module):
    """The embedding module and one dense parameter (DDP refuses a model without any)."""

    def __init__(self, embedding: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, features):
        return self.embedding(features) * self.scale


def sharded_outputs(env, seed: int) -> dict[str, float]:
    """Max |sharded - unsharded| per sharding type TorchRec offers on CPU."""
    alpha_ebc, plan = searched(seed)
    ids = random_ids(100 + env.rank)
    kjt = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), ids))
    expected = structured_reference(alpha_ebc, plan, ids)
    groups = [g.group for g in plan.groups]
    expected_sum_sq = group_sum_sq(alpha_ebc, groups, K)
    expected_gram = group_gram(alpha_ebc, groups, K)
    diffs = {}
    for kind in SHARDING_TYPES:
        for projection in PROJECTIONS:
            full = build_repacked(alpha_ebc, plan, projection)
            meta = RepackedEmbedding(plan, list(NUMS), projection, device=META)
            sharded = shard_like(env, Probe(meta), Probe(full), kind)
            diffs[f"repacked {projection} {kind}"] = (sharded(kjt) - expected).abs().max().item()
        alpha_meta = AlphaEmbeddingBagCollection(
            EmbeddingBagCollection(table_configs(NUMS, K, 0.5), device=META), skewed_blocking())
        sharded = shard_like(env, Probe(alpha_meta), Probe(alpha_ebc), kind)
        diffs[f"sum_sq {kind}"] = (group_sum_sq(sharded, groups, K) - expected_sum_sq).abs().max().item()
        try:  # cross-column sums need whole rows on one rank
            diffs[f"gram {kind}"] = (group_gram(sharded, groups, K) - expected_gram).abs().max().item()
        except ValueError as error:
            assert kind in ("column_wise", "table_column_wise") and "not whole rows" in str(error), (kind, error)
    return diffs


def shard_like(env, model, full, sharding_type: str):
    """``model`` (on meta) sharded with ``sharding_type``, holding ``full``'s values."""
    from torchrec.distributed.planner.types import ParameterConstraints

    from sharding.dmp import shard_model

    constraints = {
        c.name: ParameterConstraints(sharding_types=[sharding_type], min_partition=4)
        for m in model.modules() if isinstance(m, EmbeddingBagCollection)
        for c in m.embedding_bag_configs()
    }
    dmp = shard_model(model, env, "rowwise_adagrad", 0.01, constraints=constraints)
    load_full_state(dmp, full.state_dict())
    return dmp


@pytest.mark.multirank
def test_sharded_repacked_model_and_table_stats_equal_unsharded():
    for diffs in run_ranks(sharded_outputs, 2, 0):
        assert max(diffs.values()) < 1e-6, diffs
        assert {"gram table_wise", "gram data_parallel"} <= set(diffs), diffs


def trained_like(seed: int = 6):
    """A repacked model with a learned projection moved off its selection (as after
    training), its plan, and a rewritten batch."""
    alpha_ebc, plan = searched(seed)
    full = build_repacked(alpha_ebc, plan, "learned")
    with torch.no_grad():
        for p in full.projections.values():
            p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)))
    kjt = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), random_ids(200)))
    return full, plan, kjt


def save_each_kind(env, directory: str) -> None:
    from sharding.checkpoint import save_checkpoint

    full, plan, _ = trained_like()
    for kind in SHARDING_TYPES:
        meta = RepackedEmbedding(plan, list(NUMS), "learned", device=META)
        save_checkpoint(f"{directory}/{kind}", shard_like(env, Probe(meta), Probe(full), kind))


def load_as_other_kinds(env, directory: str) -> dict[str, float]:
    """Each 2-rank checkpoint loaded into 3 ranks sharded another way: max |difference|."""
    from sharding.checkpoint import load_checkpoint

    full, plan, kjt = trained_like()
    diffs = {}
    for saved, kind in zip(SHARDING_TYPES, SHARDING_TYPES[1:] + SHARDING_TYPES[:1]):
        blank = Probe(RepackedEmbedding(plan, list(NUMS), "learned", init_scale=0.0))
        for p in blank.embedding.projections.values():
            torch.nn.init.zeros_(p)
        dmp = shard_like(env, Probe(RepackedEmbedding(plan, list(NUMS), "learned", device=META)), blank, kind)
        load_checkpoint(f"{directory}/{saved}", dmp)
        diffs[f"{saved} -> {kind}"] = (dmp(kjt) - full(kjt)).abs().max().item()
    return diffs


@pytest.mark.multirank
def test_checkpoints_of_every_sharding_load_into_one_process_and_three_ranks(tmp_path):
    """A 2-rank checkpoint of the slab tables and learned projections, per sharding kind,
    loads into one plain process and into 3 ranks sharded another way: same outputs."""
    from sharding.checkpoint import load_checkpoint

    run_ranks(save_each_kind, 2, str(tmp_path))
    full, plan, kjt = trained_like()
    with torch.no_grad():
        for kind in SHARDING_TYPES:
            plain = Probe(RepackedEmbedding(plan, list(NUMS), "learned", init_scale=0.0))
            load_checkpoint(tmp_path / kind, plain, local=True)
            assert torch.equal(plain(kjt), full(kjt)), kind
    for diffs in run_ranks(load_as_other_kinds, 3, str(tmp_path)):
        assert max(diffs.values()) < 1e-6, diffs


def test_single_hot_key_rewriter_equals_the_key_rewriter_and_refuses_ids_outside_the_groups():
    _, plan = searched(seed=3)
    keys = list(NUMS)
    rewriter = SingleHotKeyRewriter(plan, keys)
    ids, weights = random_ids(4, rows=50), torch.rand(len(keys), 50, generator=torch.Generator().manual_seed(5))
    got, expected = rewriter(ids, weights), KeyRewriter(plan, keys).rewrite_bags(single_hot_kjt(keys, ids, weights))
    assert got.keys() == expected.keys() and got.stride() == 50
    for part in ("values", "lengths", "weights"):
        assert torch.equal(getattr(got, part)(), getattr(expected, part)().to(getattr(got, part)().dtype)), part
    for f, key in enumerate(keys):  # past the last group of the first, a middle or the last feature
        for bad in (NUMS[key], -1):
            wrong = ids.clone()
            wrong[f, 7] = bad
            with pytest.raises(ValueError, match=f"id {bad} is outside"):
                rewriter(wrong)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="shard_quant_model asserts CUDA")
def test_int8_repacked_tables_shard_over_emulated_ranks_on_one_gpu():
    """TorchRec's serving path: the int8 repacked EBC sharded table-wise over 2 emulated
    ranks of one GPU gives the unsharded int8 outputs."""
    from torchrec.inference.modules import quantize_inference_model, shard_quant_model

    alpha_ebc, plan = searched(seed=4)
    quant = quantize_inference_model(Probe(build_repacked(alpha_ebc, plan)).cuda(), output_dtype=torch.float)
    kjt = KeyRewriter(plan, list(NUMS))(single_hot_kjt(list(NUMS), random_ids(5))).to("cuda")
    with torch.no_grad():
        expected = quant(kjt)
        sharded, sharding_plan = shard_quant_model(quant, world_size=2, compute_device="cuda", sharding_device="cuda")
        assert len(sharding_plan.plan) > 0
        assert (sharded(kjt) - expected).abs().max() < 1e-5


def with_shared_rows(plan: StructuredPlan) -> StructuredPlan:
    """``plan`` with every kept group of more than 3 ids sharing a third of its rows."""
    return StructuredPlan(tuple(
        replace(g, buckets=g.group.rows // 3) if g.width and g.group.rows > 3 else g for g in plan.groups
    ), plan.embedding_dim, plan.tau)


def shared_reference(alpha_ebc, plan, ids: torch.Tensor) -> torch.Tensor:
    """The structured α-model, each id of a group of shared rows embedded as the mean
    over the ids of its group that share its row."""
    out = structured_reference(alpha_ebc, plan, ids)
    for f, key in enumerate(NUMS):
        for g in plan.groups:
            if g.group.key != key or g.buckets is None:
                continue
            members = torch.arange(g.group.start, g.group.stop)
            for b, i in enumerate(ids[f].tolist()):
                if g.group.start <= i < g.group.stop:
                    mates = members[(members - g.group.start) % g.buckets == (i - g.group.start) % g.buckets]
                    column = torch.full((len(NUMS), mates.numel()), 0, dtype=torch.int64)
                    column[f] = mates
                    out[b, f] = structured_reference(alpha_ebc, plan, column)[:, f].mean(0)
    return out


def test_groups_of_shared_rows_serve_the_mean_of_their_ids_through_both_rewriters():
    alpha_ebc, plain = searched(seed=3)
    plan = with_shared_rows(plain)
    assert sum(g.buckets is not None for g in plan.groups) >= 3
    keys = list(NUMS)
    ids = random_ids(7, rows=64)
    module = build_repacked(alpha_ebc, plan)
    assert sum(c.num_embeddings * c.embedding_dim for c in module.ebc.embedding_bag_configs()) == sum(
        g.stored_rows * g.width for g in plan.groups)
    expected = shared_reference(alpha_ebc, plan, ids)
    got = module(KeyRewriter(plan, keys)(single_hot_kjt(keys, ids)))
    assert (got - expected).abs().max() < 1e-6
    single_hot = SingleHotKeyRewriter(plan, keys)(ids)
    assert torch.equal(single_hot.values(), KeyRewriter(plan, keys).rewrite_bags(single_hot_kjt(keys, ids)).values())
    assert StructuredPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_plan_bytes_are_what_the_repacked_model_stores(projection):
    _, plain = searched(seed=4)
    plan = with_shared_rows(plain)
    module = RepackedEmbedding(plan, list(NUMS), projection)
    values = sum(c.num_embeddings * c.embedding_dim * 4 for c in module.ebc.embedding_bag_configs())
    if projection == "learned":
        projections = sum(p.numel() * 4 for p in module.projections.values())
    else:  # one uint8 model column per stored column of each feature
        projections = sum(max(g.width for g in plan.groups if g.group.key == key) for key in NUMS)
    index = 8 * len(plan.groups) + 8 * sum(g.buckets is not None for g in plan.groups)
    assert plan.embedding_bytes(projection) == values + projections + index


def test_a_checkpoint_of_another_model_is_refused_naming_a_missing_or_misshapen_weight(tmp_path):
    from sharding.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "old", torch.nn.Sequential(torch.nn.Linear(2, 1)))
    renamed = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 1))
    with pytest.raises(CheckpointMismatch, match=r"old: no 1\.weight \(and 1 more of the model's weights\)"):
        load_checkpoint(tmp_path / "old", renamed, local=True)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 1))
    with pytest.raises(CheckpointMismatch, match=r"old: 0\.weight is \[1, 2\] there, \[1, 3\] in the model"):
        load_checkpoint(tmp_path / "old", wider, local=True)
