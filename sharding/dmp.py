"""Process groups, planning and ``DistributedModelParallel`` wrapping, in one place.

Models never see any of this: launch entry points build a plain model (tables on the
``meta`` device), then call ``shard_model`` and ``make_optimizer`` from here.

Example (one process, gloo):
    >>> pg = init_distributed().process_group          # doctest: +SKIP
    >>> dmp = shard_model(model, pg, torch.device("cpu"), "rowwise_adagrad", 0.05)  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from sharding.allocator import keep_freed_memory

# Fused (in-backward) table optimizers. FBGEMM has no fused Adam on CPU ("Optimizer
# adam is not supported in CPU mode"), so row-wise Adagrad (TorchRec DLRM's choice)
# is the default everywhere; "adam" works on GPU only.
SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    process_group: Optional[dist.ProcessGroup]  # None: one process that joined no job (dnis quantize)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: int = 60, keep_freed: bool = True) -> DistEnv:
    """Join the job torchrun (or torchx) started: NCCL on GPUs, gloo on CPU.

    Without torchrun's variables it starts a one-process group, so every entry point
    runs the same code alone or under ``torchx run ... --nproc N``. With ``keep_freed``
    (training and evaluation ranks) freed memory stays in malloc's heap from here on
    (``sharding.allocator``); preprocessing, which bounds its memory, passes ``False``.
    """
    if keep_freed:
        keep_freed_memory()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank = int(os.environ.setdefault("RANK", "0"))
    world_size = int(os.environ.setdefault("WORLD_SIZE", "1"))
    local_rank = int(os.environ.setdefault("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        # Left to the interpreter's teardown, the process group's threads are destroyed
        # while joinable: under load a rank then aborts at exit ("terminate called without
        # an active exception") after its work is done.
        atexit.register(_destroy_process_group)
    return DistEnv(rank, world_size, local_rank, device, dist.group.WORLD)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks (in place) and return it."""
    return start_all_reduce_mean(tensor)()


def start_all_reduce_mean(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start averaging ``tensor`` over all ranks (in place); the returned call waits for
    it and returns it. Lets a small reduction travel while the backward computes."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return lambda: tensor
    work = dist.all_reduce(tensor, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return tensor.div_(dist.get_world_size())

    return wait


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sharders(device: torch.device) -> list:
    """TorchRec's own EBC sharder; fused optimizers come from ``apply_optimizer_in_backward``."""
    return [EmbeddingBagCollectionSharder()]


# FBGEMM's sharded kernels (table-, column-, row-wise) need widths that are multiples
# of 4; the data-parallel (dense) kernel takes any width.
SHARDED_WIDTH_MULTIPLE = 4


def narrow_table_constraints(model: nn.Module) -> dict[str, ParameterConstraints]:
    """Data-parallel constraints for every table whose width FBGEMM cannot shard.

    Narrow tables (1-3 columns: uniform dimension 1 or 2, MDE's smallest blocks) are
    cheap to replicate, and replication is the only TorchRec placement they can have.
    """
    return {
        config.name: ParameterConstraints(sharding_types=["data_parallel"])
        for module in model.modules() if isinstance(module, EmbeddingBagCollection)
        for config in module.embedding_bag_configs()
        if config.embedding_dim % SHARDED_WIDTH_MULTIPLE
    }


def plan_model(
    model: nn.Module,
    env: DistEnv,
    constraints: Optional[dict[str, ParameterConstraints]] = None,
) -> ShardingPlan:
    """A sharding plan from TorchRec's planner (the same on every rank); narrow tables
    are always data-parallel (``narrow_table_constraints``)."""
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=planner_constraints(model, constraints))
    return planner.collective_plan(model, sharders(env.device), env.process_group)


def planner_constraints(
    model: nn.Module, constraints: Optional[dict[str, ParameterConstraints]] = None
) -> Optional[dict[str, ParameterConstraints]]:
    """``constraints`` plus data-parallel for narrow tables; ``None`` when there are none."""
    return {**(constraints or {}), **narrow_table_constraints(model)} or None


def fuse_table_optimizer(model: nn.Module, sparse_optimizer: str, sparse_lr: float) -> None:
    """Give every EBC table of ``model`` its fused (in-backward) optimizer; the planner
    reads it from the parameters to count optimizer state in its storage estimates."""
    if sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise ValueError(f"sparse optimizer {sparse_optimizer!r}; known: {sorted(SPARSE_OPTIMIZERS)}")
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(
                SPARSE_OPTIMIZERS[sparse_optimizer], module.parameters(), {"lr": sparse_lr}
            )


def shard_model(
    model: nn.Module,
    env: DistEnv,
    sparse_optimizer: str,
    sparse_lr: float,
    constraints: Optional[dict[str, ParameterConstraints]] = None,
    plan: Optional[ShardingPlan] = None,
) -> DistributedModelParallel:
    """Fuse the table optimizer into backward, plan, and wrap in ``DistributedModelParallel``.

    Every ``EmbeddingBagCollection`` inside ``model`` is sharded by TorchRec's sharders;
    everything else (dense layers) is replicated and synchronised by DDP. Parameters
    with ``requires_grad=False`` (α) stay out of DDP.
    """
    fuse_table_optimizer(model, sparse_optimizer, sparse_lr)
    if plan is None:
        plan = plan_model(model, env, constraints)
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(env.process_group),
        device=env.device,
        plan=plan,
        sharders=sharders(env.device),
    )


def make_optimizer(
    model: DistributedModelParallel, dense_lr: float, sparse_optimizer: str, sparse_lr: float
) -> CombinedOptimizer:
    """One optimizer for everything that trains (not α).

    - tables with a fused kernel: their FBGEMM optimizer, applied inside backward;
    - data-parallel tables (the planner picks them for tiny tables): TorchRec gives them
      a DDP-averaged ``.grad`` and no fused optimizer, so they get a regular instance of
      the same table optimizer here, rather than silently training with the dense Adam;
    - dense layers: Adam (the paper's 1e-3).
    """
    trainable = [
        (name, p)
        for name, p in in_backward_optimizer_filter(model.named_parameters())
        if p.requires_grad
    ]
    tables = {n: p for n, p in trainable if ".embedding_bags." in n}
    dense = {n: p for n, p in trainable if n not in tables}
    table_cls = SPARSE_OPTIMIZERS[sparse_optimizer]
    parts = [
        model.fused_optimizer,
        KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=dense_lr)),
    ]
    if tables:
        parts.append(KeyedOptimizerWrapper(tables, lambda params: table_cls(params, lr=sparse_lr)))
    return CombinedOptimizer(parts)
