"""Fine-grained pruning (eq. 9): the distributed radix select finds exactly the ε a sort
of the whole Ẽ gives, ties included, and pruning a sharded model (any sharding TorchRec
offers on CPU, 2 ranks) equals pruning the unsharded Ẽ."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pipeline.prune.fine import apply_epsilon, epsilon_for_cr
from plans.bytes import nnz_for_cr
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.field_embedding import table_configs, table_name
from sharding.kjt import single_hot_kjt
from sharding.local_ranks import run_ranks
from tests.test_repack import (
    K, META, NUMS, SHARDING_TYPES, Probe, random_ids, searched, shard_like, skewed_blocking,
)

CRS = (0.5, 1.0, 2.5, 7.0, 30.0)


def tied(seed: int):
    """An α-EBC whose |Ẽ| takes few values (many ties) and some exact zeros."""
    alpha_ebc, _ = searched(seed)
    g = torch.Generator().manual_seed(seed)
    for table in alpha_ebc.ebc.embedding_bags.values():
        table.weight.data = torch.randint(-8, 9, table.weight.shape, generator=g) * 0.125
    alpha_ebc.alpha.data = torch.randint(0, 5, alpha_ebc.alpha.shape, generator=g) * 0.25
    return alpha_ebc


def whole_scaled(alpha_ebc) -> dict[str, torch.Tensor]:
    """Per feature, the whole ``Ẽ = E ⊙ α[block(id)]`` (the single-process reference)."""
    blocking = skewed_blocking()
    return {
        key: alpha_ebc.ebc.embedding_bags[table_name(key)].weight.detach()
        * alpha_ebc.alpha.detach()[torch.as_tensor(blocking.block_of(key, range(n)))]
        for key, n in NUMS.items()
    }


def exact_epsilon(alpha_ebc, target_cr: float) -> tuple[float, int]:
    """Sort every non-zero |Ẽ|: ε is just above the first value that does not fit."""
    scaled = torch.cat([s.flatten() for s in whole_scaled(alpha_ebc).values()]).abs()
    values = scaled[scaled > 0].sort(descending=True).values
    max_nnz = nnz_for_cr(scaled.numel() * 4, target_cr)
    if len(values) <= max_nnz:
        return 0.0, len(values)
    epsilon = torch.nextafter(values[max_nnz], torch.tensor(float("inf"))).item()
    return epsilon, int((values >= epsilon).sum())


def pruned_reference(alpha_ebc, epsilon: float):
    """A copy of ``alpha_ebc`` with E zeroed wherever the whole Ẽ has ``|Ẽ| < ε``."""
    pruned = copy.deepcopy(alpha_ebc)
    for key, scaled in whole_scaled(alpha_ebc).items():
        pruned.ebc.embedding_bags[table_name(key)].weight.data[scaled.abs() < epsilon] = 0.0
    return pruned


@pytest.mark.parametrize("model", ["random", "tied"])
def test_radix_select_equals_the_sorted_whole_table(model):
    alpha_ebc = searched(0)[0] if model == "random" else tied(1)
    blocking, alpha = skewed_blocking(), alpha_ebc.alpha
    short = []  # entries left unused by the budget because a tie at ε fell out
    for cr in CRS:
        found = epsilon_for_cr(alpha_ebc, blocking, alpha, cr)
        assert (found.epsilon, found.nnz) == exact_epsilon(alpha_ebc, cr), cr
        assert found.coo_bytes <= found.unpruned_bytes / cr
        short.append(nnz_for_cr(found.unpruned_bytes, cr) - found.nnz)
    assert (max(short) > 0) == (model == "tied"), short
    ids = random_ids(3)
    expected = pruned_reference(alpha_ebc, found.epsilon)(single_hot_kjt(list(NUMS), ids))
    assert apply_epsilon(alpha_ebc, blocking, alpha, found.epsilon) == found.nnz
    assert torch.equal(alpha_ebc(single_hot_kjt(list(NUMS), ids)), expected)


def test_unreachable_compression_ratios_are_refused():
    alpha_ebc = searched(0)[0]
    for cr, message in ((0.4, "COO of every entry"), (1e9, "holds no COO entry"), (0.0, "must be > 0")):
        with pytest.raises(ValueError, match=message):
            epsilon_for_cr(alpha_ebc, skewed_blocking(), alpha_ebc.alpha, cr)


def sharded_pruning(env) -> list[str]:
    """Per sharding type, what differs from the unsharded reference (nothing, we hope)."""
    failures = []
    for index, kind in enumerate(SHARDING_TYPES):
        full = tied(index) if index % 2 else searched(index)[0]
        meta = AlphaEmbeddingBagCollection(
            EmbeddingBagCollection(table_configs(NUMS, K, 0.5), device=META), skewed_blocking())
        sharded = shard_like(env, Probe(meta), Probe(full), kind)
        for cr in (1.0, 7.0):
            found = epsilon_for_cr(sharded, skewed_blocking(), full.alpha, cr)
            if (found.epsilon, found.nnz) != exact_epsilon(full, cr):
                failures.append(f"{kind} CR {cr}: {found} vs {exact_epsilon(full, cr)}")
        nnz = apply_epsilon(sharded, skewed_blocking(), full.alpha, found.epsilon)
        kjt = single_hot_kjt(list(NUMS), random_ids(10 + env.rank))
        expected = Probe(pruned_reference(full, found.epsilon))(kjt)
        got = sharded(kjt)
        if nnz != found.nnz or not torch.equal(got, expected):
            failures.append(f"{kind}: nnz {nnz} vs {found.nnz}, outputs off by {(got - expected).abs().max()}")
    return failures


@pytest.mark.multirank
def test_sharded_search_and_pruning_equal_the_unsharded_table():
    assert run_ranks(sharded_pruning, 2) == [[], []]


def test_a_result_replaces_the_one_of_its_target():
    from launch.prune import with_result

    results = [{"target_cr": 10.0, "epsilon": 0.1}, {"target_cr": None, "epsilon": 0.2}]
    again = {"target_cr": 10.0, "epsilon": 0.3}
    assert with_result(results, again) == [again, results[1]]
    by_epsilon = {"target_cr": None, "epsilon": 0.2, "nnz": 5}
    assert with_result(results, by_epsilon) == [results[0], by_epsilon]
    new = {"target_cr": 20.0, "epsilon": 0.4}
    assert with_result(results, new) == [*results, new]
