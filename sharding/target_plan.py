"""Sharding plans for a cluster this machine is not: TorchRec's planner run on CPU.

A ``Topology`` needs no devices, so ``EmbeddingShardingPlanner.plan`` can place a
model's tables on 8 or 64 GPUs of a given memory from a laptop. The model is built on
the ``meta`` device with its fused table optimizer (``dmp.fuse_table_optimizer``), so
the planner counts optimizer state as it would for training.

Two byte counts per rank:

- ``planner_hbm`` / ``planner_ddr``: the storage estimates the planner placed against
  each device's capacity (weights, optimizer state, input/output buffers, caches), read
  through TorchRec's public ``Stats`` hook, which receives the chosen shards.
- ``weights`` / ``optimizer``: from the ``ShardingPlan``'s shard sizes, rows × columns ×
  bytes per element of each shard on the rank, plus optimizer state counted as the
  planner counts it (``OPTIMIZER_STATE``). Data-parallel tables count on every rank.

Example:
    >>> cluster = TargetCluster(world_size=8, hbm_gib=80)
    >>> plan = plan_for_cluster(model, cluster, batch_size=8192)   # doctest: +SKIP
    >>> [t.sharding_type for t in plan.tables][:1]                 # doctest: +SKIP
    ['table_wise']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import CustomTopologyData, ParameterConstraints, PlannerError, Stats
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sharding.dmp import planner_constraints, sharders

GIB = 1024**3  # TorchRec's capacity unit (its default HBM_CAP is 32 * 1024**3)
COMPUTE_DEVICES = ("cuda", "cpu")

# Optimizer state per weight element, as TorchRec's planner estimates it
# (shard_estimators: Adam 2, SGD 0, row-wise Adagrad one value per row, others 1).
OPTIMIZER_STATE = {"adam": 2.0, "sgd": 0.0, "adagrad": 1.0, "rowwise_adagrad": None}


def optimizer_state_bytes(rows: int, cols: int, element_size: int, sparse_optimizer: str) -> int:
    """Bytes of ``sparse_optimizer``'s state for a ``rows × cols`` shard.

    Example:
        >>> optimizer_state_bytes(10, 8, 4, "rowwise_adagrad"), optimizer_state_bytes(10, 8, 4, "adam")
        (40, 640)
    """
    factor = OPTIMIZER_STATE[sparse_optimizer]
    if factor is None:  # row-wise: one accumulator per row
        return rows * element_size
    return int(rows * cols * element_size * factor)


@dataclass(frozen=True)
class TargetCluster:
    """The devices to plan for; ``None`` capacities take TorchRec's defaults."""

    world_size: int
    local_world_size: int = 8
    hbm_gib: Optional[float] = None
    ddr_gib: Optional[float] = None
    compute_device: str = "cuda"

    def __post_init__(self) -> None:
        if self.compute_device not in COMPUTE_DEVICES:
            raise ValueError(f"compute device {self.compute_device!r}: expected one of {COMPUTE_DEVICES}")
        if self.world_size < 1 or self.local_world_size < 1:
            raise ValueError(f"world size {self.world_size} and local world size {self.local_world_size} must be >= 1")

    def topology(self) -> Topology:
        """TorchRec's ``Topology`` (public constructor arguments only; a host never
        holds more ranks than the whole job).

        Given capacities go in as per-device ``CustomTopologyData``, not as ``hbm_cap`` /
        ``ddr_cap``: TorchRec 1.6 reads those with ``cap if cap else default``, so a
        capacity of 0 (``--ddr-gb 0``: nothing to spill to) became 128 GiB there; 1.8
        checks ``is not None``. The per-device lists are taken as given by both. HBM
        stays TorchRec's 0 on a CPU topology, as ``hbm_cap`` did."""
        caps = {}
        if self.hbm_gib is not None and self.compute_device == "cuda":
            caps["hbm_cap"] = [int(self.hbm_gib * GIB)] * self.world_size
        if self.ddr_gib is not None:
            caps["ddr_cap"] = [int(self.ddr_gib * GIB)] * self.world_size
        return Topology(
            world_size=self.world_size,
            compute_device=self.compute_device,
            local_world_size=min(self.local_world_size, self.world_size),
            custom_topology_data=CustomTopologyData(caps, self.world_size) if caps else None,
        )

    def resized(self, world_size: int) -> "TargetCluster":
        return replace(self, world_size=world_size)


@dataclass(frozen=True)
class TablePlacement:
    """Where the planner put one table."""

    module: str  # path of its EBC in the model
    table: str
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    weight_bytes: int  # the whole table, once


@dataclass(frozen=True)
class RankBytes:
    """Bytes on one rank: the planner's estimates and the shard sizes' count."""

    rank: int
    planner_hbm: int
    planner_ddr: int
    weights: int
    optimizer: int


@dataclass(frozen=True)
class TargetPlan:
    """A planned model: tables, per-rank bytes and what they sum to.

    ``sum(r.weights for r in ranks) == table_bytes + (world_size - 1) * replicated_bytes``
    (every table once, plus the extra copies of data-parallel tables).
    """

    cluster: TargetCluster
    batch_size: int
    capacity_hbm: int  # per device, as the topology holds it
    capacity_ddr: int
    tables: tuple[TablePlacement, ...]
    ranks: tuple[RankBytes, ...]
    table_bytes: int
    replicated_bytes: int

    def totals(self) -> dict[str, int]:
        """Sum over ranks of each byte count."""
        return {
            name: sum(getattr(r, name) for r in self.ranks)
            for name in ("planner_hbm", "planner_ddr", "weights", "optimizer")
        }

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["totals"] = self.totals()
        return doc


class _ShardStorage(Stats):
    """TorchRec's ``Stats`` hook, kept for the chosen shards' storage per rank."""

    def __init__(self) -> None:
        self.hbm: dict[int, int] = {}
        self.ddr: dict[int, int] = {}

    # ``Stats.log``'s keywords; older TorchRec passes fewer (hence the defaults), a
    # version passing a new one fails here loudly rather than being ignored.
    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals,
            num_plans, run_time, best_plan, constraints=None, sharders=None, enumerator=None,
            debug=False, debug_stats=None) -> None:
        self.hbm, self.ddr = {}, {}
        for option in best_plan:
            for shard in option.shards:
                if shard.rank is not None and shard.storage is not None:
                    self.hbm[shard.rank] = self.hbm.get(shard.rank, 0) + shard.storage.hbm
                    self.ddr[shard.rank] = self.ddr.get(shard.rank, 0) + shard.storage.ddr


def plan_for_cluster(
    model: nn.Module,
    cluster: TargetCluster,
    batch_size: int,
    sparse_optimizer: str,
    constraints: Optional[dict[str, ParameterConstraints]] = None,
) -> TargetPlan:
    """Plan ``model`` (tables on ``meta``, fused optimizer applied) for ``cluster``.

    Args:
        batch_size: rows per rank per step (the planner sizes buffers and costs by it).
        sparse_optimizer: the tables' optimizer, for the optimizer-state count.
        constraints: per table name, on top of ``dmp.planner_constraints``'s.

    Raises:
        PlannerError: TorchRec's "no plan" error (nothing fits, or constraints conflict).
    """
    topology = cluster.topology()
    storage = _ShardStorage()
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, stats=[storage],
        constraints=planner_constraints(model, constraints), debug=False,
    )
    sharding_plan = planner.plan(model, sharders(torch.device(cluster.compute_device)))
    tables, weights, optimizer, replicated = _placements(model, sharding_plan, cluster.world_size, sparse_optimizer)
    ranks = tuple(
        RankBytes(r, storage.hbm.get(r, 0), storage.ddr.get(r, 0), weights.get(r, 0), optimizer.get(r, 0))
        for r in range(cluster.world_size)
    )
    device = topology.devices[0].storage
    return TargetPlan(
        cluster, batch_size, device.hbm, device.ddr, tables, ranks,
        table_bytes=sum(t.weight_bytes for t in tables), replicated_bytes=replicated,
    )


def _placements(model: nn.Module, sharding_plan: ShardingPlan, world_size: int, sparse_optimizer: str):
    """Table placements, weight and optimizer bytes per rank, and the data-parallel tables' bytes."""
    tables, weights, optimizer, replicated = [], {}, {}, 0

    def add(rank: int, rows: int, cols: int, element_size: int) -> None:
        weights[rank] = weights.get(rank, 0) + rows * cols * element_size
        optimizer[rank] = optimizer.get(rank, 0) + optimizer_state_bytes(rows, cols, element_size, sparse_optimizer)

    for path, module_plan in sharding_plan.plan.items():
        ebc = model.get_submodule(path)
        if not isinstance(ebc, EmbeddingBagCollection):
            raise TypeError(f"{path}: planned module is {type(ebc).__name__}, expected an EmbeddingBagCollection")
        configs = {c.name: c for c in ebc.embedding_bag_configs()}
        for name, sharding in module_plan.items():
            config = configs[name]
            element_size = data_type_to_dtype(config.data_type).itemsize
            if sharding.sharding_spec is None:  # data parallel: a whole copy on every rank
                shards = [(r, config.num_embeddings, config.embedding_dim) for r in range(world_size)]
                replicated += config.num_embeddings * config.embedding_dim * element_size
            else:
                shards = [(s.placement.rank(), *s.shard_sizes) for s in sharding.sharding_spec.shards]
            for rank, rows, cols in shards:
                add(rank, rows, cols, element_size)
            tables.append(TablePlacement(
                path, name, sharding.sharding_type, sharding.compute_kernel,
                tuple(sorted({r for r, _, _ in shards})),
                config.num_embeddings * config.embedding_dim * element_size,
            ))
    return tuple(tables), weights, optimizer, replicated


def smallest_world_size(
    model: nn.Module,
    cluster: TargetCluster,
    batch_size: int,
    sparse_optimizer: str,
    constraints: Optional[dict[str, ParameterConstraints]] = None,
    max_world_size: int = 4096,
) -> Optional[int]:
    """The first of 1, 2, 4, ... ``max_world_size`` devices (each like ``cluster``'s)
    on which the planner finds a plan; ``None`` when none does.

    Only TorchRec's ``PlannerError`` counts as "does not fit"; anything else is a bug
    and propagates.
    """
    for exponent in range(int(math.log2(max_world_size)) + 1):
        world_size = 2**exponent
        try:
            plan_for_cluster(model, cluster.resized(world_size), batch_size, sparse_optimizer, constraints)
        except PlannerError:
            continue
        return world_size
    return None
