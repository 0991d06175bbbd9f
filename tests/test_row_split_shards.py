"""Row-wise, table-row-wise and grid pieces (TorchRec makes them only on CUDA) read like
any other sharding. Tables split by hand into uneven row slices and row × column
rectangles, with several pieces of one table on one rank, are given by ``state_dict()``
as ShardedTensors or as TorchRec's DTensor form, the way a DMP-sharded EBC gives them.
On gloo ranks: column statistics, the fine-grained ε and its pruning, full-state loads
and DCP checkpoints (2 ranks -> 1 process, 2 ranks -> 3 ranks) equal the unsharded table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as DTensorShard
from torchrec.distributed.shards_wrapper import LocalShardsWrapper
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from launch.retrain import repacked_state
from pipeline.prune.fine import apply_epsilon, epsilon_for_cr
from pipeline.prune.plan import group_ranges
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.checkpoint import load_checkpoint, load_full_state, save_checkpoint
from sharding.field_embedding import table_configs, table_name
from sharding.local_ranks import run_ranks
from sharding.repack import repacked_weights
from sharding.shard_pieces import local_pieces
from sharding.table_stats import group_gram, group_sum_sq
from tests.test_prune_fine import exact_epsilon, pruned_reference, tied
from tests.test_repack import K, META, NUMS, Probe, searched, skewed_blocking

FORMS = ("sharded_tensor", "dtensor")
# Per table, its pieces as (rank, (first row, end row), (first column, end column)).
TWO_RANKS = {
    "a": [(0, (0, 7), (0, K)), (1, (7, 40), (0, K)), (0, (40, 60), (0, K))],  # uneven rows; rank 0 twice
    "b": [(1, (0, 9), (0, 4)), (0, (0, 9), (4, K)), (0, (9, 17), (0, 4)), (1, (9, 17), (4, K))],  # grid
    # Table-row-wise on rank 1; rank 0 gets no rows (as row-wise gives a rank past a small table's end).
    "c": [(1, (0, 2), (0, K)), (1, (2, 5), (0, K)), (0, (5, 5), (0, K))],
}
THREE_RANKS = {  # three pieces per table, cut elsewhere than TWO_RANKS: reads span stored pieces
    "a": [(2, (0, 25), (0, K)), (0, (25, 26), (0, K)), (1, (26, 60), (0, K))],
    "b": [(2, (0, 12), (0, 4)), (0, (0, 12), (4, K)), (2, (12, 17), (0, K))],
    "c": [(1, (0, 1), (0, K)), (0, (1, 4), (0, K)), (2, (4, 5), (0, K))],
}


def full_tables(alpha_ebc) -> dict[str, torch.Tensor]:
    return {key: alpha_ebc.ebc.embedding_bags[table_name(key)].weight.detach() for key in NUMS}


def state_name(key: str) -> str:
    """Where ``Probe(α-EBC).state_dict()`` (and a DMP-sharded one) keeps ``key``'s table."""
    return f"embedding.ebc.embedding_bags.{table_name(key)}.weight"


class HandSharded(nn.Module):
    """``Probe(α-EBC)`` with its tables split by hand over ranks.

    ``state_dict()`` gives each table as this rank's pieces of it (a ShardedTensor, or a
    DTensor over TorchRec's ``LocalShardsWrapper``) and the rest (α, ``scale``) as the
    plain module's, as a DMP-sharded model does. ``pieces`` keeps, per table, this
    rank's ``(rows, columns, values)`` as laid out, to check them without the metadata.
    """

    def __init__(self, tables: dict[str, torch.Tensor], layout: dict, rank: int, world_size: int, form: str) -> None:
        super().__init__()
        self.dense = Probe(AlphaEmbeddingBagCollection(
            EmbeddingBagCollection(table_configs(NUMS, K, 0.5), device=META), skewed_blocking()))
        self.pieces = {
            key: [((r0, r1), (c0, c1), tables[key][r0:r1, c0:c1].clone())
                  for owner, (r0, r1), (c0, c1) in layout[key] if owner == rank]
            for key in NUMS
        }
        mesh = init_device_mesh("cpu", (world_size,)) if form == "dtensor" else None
        self.tables = {state_name(key): self._table(key, rank, mesh) for key in NUMS}

    def _table(self, key: str, rank: int, mesh) -> torch.Tensor:
        size = (NUMS[key], K)
        if mesh is None:
            shards = [Shard(values, ShardMetadata([r0, c0], [r1 - r0, c1 - c0], f"rank:{rank}/cpu"))
                      for (r0, r1), (c0, c1), values in self.pieces[key]]
            return init_from_local_shards(shards, *size)
        wrapper = LocalShardsWrapper(
            [values for _, _, values in self.pieces[key]],
            [(r0, c0) for (r0, _), (c0, _), _ in self.pieces[key]],
        )
        # TorchRec's own row-wise DTensor (rw_sharding.py): Shard(0), global shape and stride.
        return DTensor.from_local(
            wrapper, mesh, placements=(DTensorShard(0),), shape=torch.Size(size), stride=(K, 1), run_check=False)

    def state_dict(self, *args, **kwargs):  # callers here pass no prefix or destination
        state = self.dense.state_dict()
        state.update(self.tables)
        return state

    def load_state_dict(self, state, strict: bool = True):
        """The tables' pieces load in place (DCP does); the rest into the plain module."""
        if any(state[name] is not table for name, table in self.tables.items()):
            raise ValueError("tables of a HandSharded module load in place only")
        return self.dense.load_state_dict({n: v for n, v in state.items() if n not in self.tables}, strict=False)

    def differences(self, expected: dict[str, torch.Tensor], alpha: torch.Tensor | None = None) -> list[str]:
        """What of this rank's pieces (and α, if given) differs from the slices of ``expected``."""
        out = [
            f"{key} rows {r0}:{r1} columns {c0}:{c1}"
            for key, pieces in self.pieces.items()
            for (r0, r1), (c0, c1), values in pieces
            if not torch.equal(values, expected[key][r0:r1, c0:c1])
        ]
        if alpha is not None and not torch.equal(self.dense.embedding.alpha, alpha):
            out.append("alpha")
        return out


def test_layouts_are_what_the_tests_claim():
    for layout, ranks in ((TWO_RANKS, 2), (THREE_RANKS, 3)):
        for key, pieces in layout.items():
            covered = torch.zeros(NUMS[key], K, dtype=torch.int64)
            for _, (r0, r1), (c0, c1) in pieces:
                covered[r0:r1, c0:c1] += 1
            assert bool((covered == 1).all()), key  # the pieces tile the table
            assert {owner for owner, _, _ in pieces} <= set(range(ranks))
    rows = [r1 - r0 for _, (r0, r1), _ in TWO_RANKS["a"]]
    assert len(set(rows)) == len(rows)  # uneven
    assert [owner for owner, _, _ in TWO_RANKS["a"]].count(0) == 2
    assert any(r0 > 0 and c0 > 0 for _, (r0, _), (c0, _) in TWO_RANKS["b"])  # grid


def pieces_equal_the_whole_table(env) -> list[str]:
    """Per form and model, what differs from the unsharded reference (nothing, we hope)."""
    blocking = skewed_blocking()
    groups = group_ranges(blocking, NUMS, ranges_per_block=2)  # cuts inside pieces
    failures = []
    for form in FORMS:
        for name, full in (("random", searched(0)[0]), ("tied", tied(1))):
            case, tables = f"{form} {name}", full_tables(full)
            sharded = HandSharded(tables, TWO_RANKS, env.rank, env.world_size, form)
            expected = torch.stack([
                (tables[g.key][g.start : g.stop].double() ** 2).sum(0) for g in groups])
            got = group_sum_sq(sharded, groups, K)
            if not torch.allclose(got, expected, rtol=1e-12, atol=0):
                failures.append(f"{case}: group_sum_sq off by {(got - expected).abs().max()}")
            whole = [g for g in groups if g.key != "b"]  # b is a grid: no rank holds its whole rows
            gram = torch.stack([tables[g.key][g.start : g.stop].double().T @ tables[g.key][g.start : g.stop].double()
                                for g in whole])
            if not torch.allclose(group_gram(sharded, whole, K), gram, rtol=1e-12, atol=1e-15):
                failures.append(f"{case}: group_gram differs")
            try:
                group_gram(sharded, groups, K)
                failures.append(f"{case}: group_gram read a grid's rows as whole")
            except ValueError as error:
                if table_name("b") not in str(error):
                    failures.append(f"{case}: {error}")
            for cr in (1.0, 7.0):
                found = epsilon_for_cr(sharded, blocking, full.alpha, cr)
                unsharded = epsilon_for_cr(full, blocking, full.alpha, cr)
                if found != unsharded or (found.epsilon, found.nnz) != exact_epsilon(full, cr):
                    failures.append(f"{case} CR {cr}: {found} vs {unsharded}, sorted {exact_epsilon(full, cr)}")
            nnz = apply_epsilon(sharded, blocking, full.alpha, found.epsilon)
            if nnz != found.nnz:
                failures.append(f"{case}: apply_epsilon kept {nnz}, not {found.nnz}")
            pruned = full_tables(pruned_reference(full, found.epsilon))
            failures += [f"{case} pruned: {d}" for d in sharded.differences(pruned)]
            loaded = HandSharded({k: torch.zeros_like(t) for k, t in tables.items()}, TWO_RANKS,
                                 env.rank, env.world_size, form)
            load_full_state(loaded, Probe(full).state_dict())
            failures += [f"{case} load_full_state: {d}" for d in loaded.differences(tables, full.alpha)]
    return failures


def unknown_dtensor_forms_refused(env) -> list[str]:
    """DTensor tables whose pieces' offsets are unknown (no ``LocalShardsWrapper``) or
    that are replicated (2-D parallel): what is read without the error it should raise."""
    piece = torch.zeros(3, K)
    wrapped = LocalShardsWrapper([piece], [(3 * env.rank, 0)])
    forms = {
        "plain local tensor": DTensor.from_local(piece, init_device_mesh("cpu", (env.world_size,)), (DTensorShard(0),)),
        "replicated": DTensor.from_local(
            wrapped, init_device_mesh("cpu", (env.world_size, 1)), (Replicate(), DTensorShard(0)),
            shape=torch.Size((3, K)), stride=(K, 1), run_check=False),
    }
    missed = []
    for name, tensor in forms.items():
        try:
            list(local_pieces(tensor, counted_once=True))
            missed.append(f"{name} DTensor read without an error")
        except TypeError:
            pass
    return missed


def row_split_checks(env) -> list[str]:
    return pieces_equal_the_whole_table(env) + unknown_dtensor_forms_refused(env)


@pytest.mark.multirank
def test_stats_epsilon_pruning_and_full_loads_of_row_split_pieces_equal_the_whole_table():
    assert run_ranks(row_split_checks, 2) == [[], []]


def saved_models() -> dict[str, AlphaEmbeddingBagCollection]:
    """Per form, the α-EBC its checkpoint is saved from (a different one each)."""
    return {form: searched(seed)[0] for seed, form in enumerate(FORMS)}


def save_row_split(env, directory: str) -> None:
    for form, full in saved_models().items():
        model = HandSharded(full_tables(full), TWO_RANKS, env.rank, env.world_size, form)
        model.dense.embedding.alpha.data.copy_(full.alpha)
        save_checkpoint(f"{directory}/{form}", model, extra={"form": form})


def load_three_pieces(env, directory: str) -> list[str]:
    """Each checkpoint loaded into a 3-piece split of either form: what differs."""
    failures = []
    for saved_form, full in saved_models().items():
        tables = full_tables(full)
        for form in FORMS:
            zeros = {k: torch.zeros_like(t) for k, t in tables.items()}
            model = HandSharded(zeros, THREE_RANKS, env.rank, env.world_size, form)
            load_checkpoint(f"{directory}/{saved_form}", model)
            failures += [f"{saved_form} -> {form}: {d}" for d in model.differences(tables, full.alpha)]
    return failures


@pytest.mark.multirank
def test_checkpoint_of_row_split_pieces_loads_into_one_process_and_three_pieces(tmp_path):
    run_ranks(save_row_split, 2, str(tmp_path))
    _, plan = searched(0)
    for form, full in saved_models().items():
        unsharded = Probe(AlphaEmbeddingBagCollection(
            EmbeddingBagCollection(table_configs(NUMS, K, 0.5)), skewed_blocking()))
        for table in unsharded.embedding.ebc.embedding_bags.values():
            nn.init.zeros_(table.weight)
        assert load_checkpoint(tmp_path / form, unsharded, local=True) == {"form": form}
        for name, value in Probe(full).state_dict().items():
            assert torch.equal(unsharded.state_dict()[name], value), (form, name)
        # What retrain's initial_state repacks from such a checkpoint: the source's tables.
        repacked = repacked_state(SimpleNamespace(model=unsharded), plan, list(NUMS))
        for name, values in repacked_weights(plan, list(NUMS), full_tables(full), full.alpha.detach()).items():
            assert torch.equal(repacked[f"model.embedding.ebc.embedding_bags.{name}.weight"], values), name
    assert run_ranks(load_three_pieces, 3, str(tmp_path)) == [[], [], []]
