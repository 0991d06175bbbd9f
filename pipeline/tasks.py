"""What one training step computes, and how the model of a run is built.

A task is an ``nn.Module`` with the ``TrainPipeline`` convention: ``forward(batch)``
returns ``(loss, outputs)``. ``TrainTask`` is plain supervised training (the reference);
``pipeline.search.dnis.DNISTask`` is the search step. The loop runs either without
knowing which model or task it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pipeline.config import Config, ConfigError
from pipeline.data.batch import Batch
from pipeline.models import build_model
from pipeline.search.dnis import DNISTask
from pipeline.search.qr import plan_qr
from plans.blocking import Blocking
from plans.qr import QRPlan
from plans.structured import StructuredPlan
from sharding.alpha_ebc import AlphaEmbeddingBagCollection
from sharding.field_embedding import FieldEmbeddingCollection, table_configs
from sharding.qr_embedding import QREmbedding
from sharding.repack import RepackedEmbedding


class Layout(Protocol):
    """The parts of ``pipeline.data.features.FeatureLayout`` that building a model needs."""

    keys: Sequence[str]
    weighted: bool
    num_embeddings: dict[str, int]
    num_dense: int
    multi_hot_keys: tuple[str, ...]


class TrainTask(nn.Module):
    """Plain training: binary cross-entropy of the model's logits on every row."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(batch.dense, batch.sparse)
        # Padding rows (label -1) only occur in evaluation, where metrics mask them.
        loss = bce(logits, batch.labels.clamp(min=0))
        return loss, {"loss": loss.detach(), "logits": logits.detach(), "labels": batch.labels}


def _ebc(cfg: Config, layout: Layout, device: torch.device, multi_hot=(), num_blocks=1):
    if cfg.model.embedding != "full":
        raise ValueError(f"model.embedding={cfg.model.embedding} trains with launch.train only; search needs full tables")
    configs = table_configs(
        layout.num_embeddings, cfg.model.embedding_dim, cfg.model.init_scale, multi_hot, num_blocks
    )
    return EmbeddingBagCollection(configs, is_weighted=layout.weighted, device=device)


def _model(cfg: Config, layout: Layout, embedding: nn.Module) -> nn.Module:
    num_dense = layout.num_dense if cfg.data.dense_mode == "mlp" else 0
    return build_model(cfg.model, embedding, len(layout.keys), num_dense)


def qr_plan(cfg: Config, layout: Layout) -> Optional[QRPlan]:
    """The QR baseline's table sizes for ``model.embedding=qr``; ``None`` for full tables.

    Raises:
        ConfigError: when a QR table's feature is multi-hot (QR multiplies pooled sums).
    """
    model = cfg.model
    if model.embedding != "qr":
        return None
    plan = plan_qr(layout.num_embeddings, model.embedding_dim, model.qr_min_rows, model.qr_target_cr)
    multi = [key for key in layout.multi_hot_keys if key in plan.remainders]
    if multi:
        raise ConfigError(
            f"model.embedding=qr needs single-hot bags, but data.multi_hot_sizes makes the QR tables' "
            f"features {multi} multi-hot (raise model.qr_min_rows past their rows, or set their sizes to 1)"
        )
    return plan


def build_train_task(cfg: Config, layout: Layout, device: torch.device) -> TrainTask:
    """The reference: the configured model on a plain EBC (tables on ``device``, e.g. meta),
    or on QR tables (``model.embedding=qr``, batches rewritten by ``QRKeyWriter``)."""
    plan = qr_plan(cfg, layout)
    if plan is not None:
        embedding = QREmbedding(plan, layout.keys, cfg.model.init_scale, layout.weighted, device)
    else:
        embedding = FieldEmbeddingCollection(_ebc(cfg, layout, device), layout.keys)
    return TrainTask(_model(cfg, layout, embedding))


def build_search_task(
    cfg: Config, layout: Layout, blocking: Blocking, device: torch.device
) -> DNISTask:
    """The configured model on an α-EBC, wrapped in the DNIS step; its multi-hot keys read
    their ids split per block (``split_multi_hot``)."""
    multi_hot = layout.multi_hot_keys
    ebc = _ebc(cfg, layout, device, multi_hot, blocking.num_blocks)
    embedding = AlphaEmbeddingBagCollection(ebc, blocking, multi_hot)
    return DNISTask(
        _model(cfg, layout, embedding), cfg.data.batch_size, cfg.search.alpha_interval,
        cfg.search.alpha_grad_dtype,
    )


def build_retrain_task(
    cfg: Config, layout: Layout, plan: StructuredPlan, projection: str, device: torch.device
) -> TrainTask:
    """The configured model on the repacked mixed-width tables of a structured prune."""
    embedding = RepackedEmbedding(
        plan, layout.keys, projection, layout.weighted, device, cfg.model.init_scale
    )
    return TrainTask(_model(cfg, layout, embedding))


@dataclass
class RunTask:
    """The task whose weights a run directory's checkpoints hold, and what shaped it."""

    task: nn.Module
    blocking: Optional[Blocking] = None  # search runs: the α blocks
    plan: Optional[StructuredPlan] = None  # retrain runs: the repacked tables
    projection: Optional[str] = None


def retrained_plan(run_dir: str | Path) -> Optional[dict]:
    """The ``prune.json`` of a retrain run (it names the run it was pruned from), else
    ``None``: a search or train run may hold a ``prune.json`` of its own prune."""
    path = Path(run_dir) / "prune.json"
    pruned = json.loads(path.read_text()) if path.is_file() else {}
    return pruned if "search_run" in pruned else None


def build_run_task(run_dir: str | Path, cfg: Config, layout: Layout, device: torch.device) -> RunTask:
    """The task of a run directory, by what it holds: ``blocking.json`` a search, a
    retrain's ``prune.json`` a retrain (its plan and projection), else a plain train run."""
    run_dir = Path(run_dir)
    if (run_dir / "blocking.json").is_file():
        blocking = Blocking.from_json(json.loads((run_dir / "blocking.json").read_text()))
        return RunTask(build_search_task(cfg, layout, blocking, device), blocking=blocking)
    pruned = retrained_plan(run_dir)
    if pruned is not None:
        plan = StructuredPlan.from_json(pruned["plan"])
        task = build_retrain_task(cfg, layout, plan, pruned["projection"], device)
        return RunTask(task, plan=plan, projection=pruned["projection"])
    return RunTask(build_train_task(cfg, layout, device))
