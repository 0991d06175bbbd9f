"""AUC and logloss over a split, aggregated across ranks by torchmetrics."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC

from pipeline.data.batch import Batch
from pipeline.progress import progress_bar


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    max_batches: Optional[int] = None,
    show_progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """AUC, logloss and row count of ``model`` (a task: ``(loss, outputs)``) on ``batches``.

    Rows labelled ``-1`` (the loader's padding, so every rank runs the same number of
    batches) are left out. With a process group initialised, torchmetrics gathers the
    states of all ranks in ``compute()``, so every rank returns the global numbers.
    """
    auroc = BinaryAUROC().to(device)
    logloss = MeanMetric().to(device)
    rows = SumMetric().to(device)
    was_training = model.training
    model.eval()
    for i, batch in enumerate(progress_bar(batches, desc=desc, disable=not show_progress, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        _, out = model(batch.to(device))
        keep = out["labels"] >= 0
        logits, labels = out["logits"][keep], out["labels"][keep]
        auroc.update(torch.sigmoid(logits), labels.long())
        losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        logloss.update(losses)
        rows.update(keep.sum())
    model.train(was_training)
    return {
        "auc": float(auroc.compute()),
        "logloss": float(logloss.compute()),
        "rows": int(rows.compute()),
    }


def binary_metrics(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC and logloss of scored rows in one process (``dnis predict``)."""
    p = probabilities.double().clamp(1e-7, 1 - 1e-7)
    return {
        "auc": float(BinaryAUROC()(probabilities, labels.long())),
        "logloss": float(nn.functional.binary_cross_entropy(p, labels.double())),
    }
