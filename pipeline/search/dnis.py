"""The DNIS search step (paper Algorithm 1, first-order), one input distribution per step.

Each step the loader sends one batch: ``train_rows`` train rows, then (on α steps)
validation rows. ``DNISTask.forward`` runs the (sharded) EBC once for all of them:

- train rows: embeddings scaled by α (a constant here), interaction, train loss; the
  caller's backward updates the tables (fused optimizer) and the dense layers (DDP).
  That backward hands the EBC one gradient for its whole output, zeros on the
  validation rows (``sharding.scaled_fields``): one lookup has one output;
- validation rows: pooled embeddings *detached*, scaled by a fresh leaf copy of α,
  interaction, validation loss, and ``autograd.grad`` of it with respect to that copy.

Taking α's gradient at the pre-update Θ is the first-order approximation (``ξ = 0`` in
eq. 7), as in first-order DARTS. The validation rows' interaction runs in
``search.alpha_grad_dtype`` (``auto``: bfloat16 where matmuls run natively in it, see
``autocast_for``): α only ever sees that gradient normalised row by row (eq. 8) and
through Adam, and in bfloat16 the pass costs about half of float32's on an AMX CPU.
``AlphaUpdater`` then averages the gradient over ranks (started before the backward),
normalises it row-wise (eq. 8), takes an Adam step and clips α to [0, 1].
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from pipeline.config import ALPHA_GRAD_DTYPES
from pipeline.data.batch import Batch


def alpha_gradient(loss: torch.Tensor, alpha_leaf: torch.Tensor) -> torch.Tensor:
    """``∂loss/∂alpha_leaf`` without touching any parameter's ``.grad``."""
    return torch.autograd.grad(loss, alpha_leaf)[0]


# Keep autograd.grad out of the FX trace that TrainPipelineSparseDist takes of the model.
torch.fx.wrap("alpha_gradient")


def autocast_for(name: str) -> tuple[str, torch.dtype]:
    """Device type and dtype of the validation rows' pass (the search runs on CUDA when
    it is there, ``sharding.dmp``): ``float32``, ``bfloat16``, or ``auto``: bfloat16 on
    CUDA and on CPUs with AMX tiles (oneDNN runs bfloat16 matmuls natively there:
    DeepFM's MLP forward + input gradient at 1024 rows takes 12 against 34 ms on one
    thread), float32 elsewhere, where bfloat16 matmuls are emulated.

    >>> autocast_for("float32")[1]
    torch.float32
    """
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "auto":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        name = "bfloat16" if device_type == "cuda" or amx() else "float32"
    if name not in ALPHA_GRAD_DTYPES:
        raise ValueError(f"search.alpha_grad_dtype: expected one of {ALPHA_GRAD_DTYPES}, got {name!r}")
    return device_type, getattr(torch, name)


def normalize_rows(grad: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 8: divide each row of α's gradient by its mean absolute value (+ eps).

    >>> normalize_rows(torch.tensor([[2.0, -2.0], [0.001, 0.003]]), eps=0.0).tolist()
    [[1.0, -1.0], [0.5, 1.5]]
    """
    return grad / (grad.abs().mean(dim=1, keepdim=True) + eps)


class DNISTask(nn.Module):
    """Search step around a model whose ``embedding`` is an ``AlphaEmbeddingBagCollection``.

    Args:
        model: a ``CTRModel`` (any of ``pipeline.models``) built on the α-EBC.
        train_rows: rows of each batch that are train rows (static, per rank).
        alpha_interval: α gets a gradient every this many training steps, starting at
            the first; the loader adds validation rows exactly on those steps.
        alpha_grad_dtype: dtype name of the validation rows' interaction
            (``autocast_for``).

    ``forward(batch)`` returns ``(train_loss, outputs)``, the ``TrainPipeline`` convention;
    ``outputs`` holds ``loss``, ``logits`` and ``labels`` of the train rows and, on α
    steps, ``val_loss`` and ``grad_alpha``. In eval mode every row is a train row.
    """

    def __init__(
        self, model: nn.Module, train_rows: int, alpha_interval: int = 1,
        alpha_grad_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.model = model
        self.train_rows = train_rows
        self.alpha_interval = alpha_interval
        self.autocast_device, self.alpha_grad_dtype = autocast_for(alpha_grad_dtype)
        self.steps_taken = 0  # restored from checkpoints so α steps stay on schedule

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embedding = self.model.embedding
        pooled = embedding.lookup(batch.sparse)
        alpha = embedding.alpha
        if not self.training:
            logits = self.model.interact(batch.dense, embedding.apply_alpha(pooled, alpha))
            loss = bce(logits, batch.labels.clamp(min=0))
            return loss, {"loss": loss.detach(), "logits": logits.detach(), "labels": batch.labels}
        n = self.train_rows
        alpha_step = self.steps_taken % self.alpha_interval == 0
        self.steps_taken += 1
        train_emb = embedding.apply_alpha(pooled, alpha, 0, n)
        logits = self.model.interact(batch.dense[:n], train_emb)
        loss = bce(logits, batch.labels[:n])
        out = {"loss": loss.detach(), "logits": logits.detach(), "labels": batch.labels[:n]}
        if alpha_step:
            alpha_leaf = alpha.detach().requires_grad_(True)
            val_emb = embedding.apply_alpha(pooled.detach(), alpha_leaf, n)
            dtype = self.alpha_grad_dtype
            with torch.autocast(self.autocast_device, dtype=dtype, enabled=dtype != torch.float32):
                val_logits = self.model.interact(batch.dense[n:], val_emb)
            val_loss = bce(val_logits.float(), batch.labels[n:])
            out["val_loss"] = val_loss.detach()
            out["grad_alpha"] = alpha_gradient(val_loss, alpha_leaf)
        return loss, out


class AlphaUpdater:
    """Applies α gradients: mean over ranks, eq. 8, Adam (lr 1e-2 in the paper), clip [0, 1].

    Args:
        alpha: the α parameter (``requires_grad=False``; kept out of DDP).
        lr: Adam learning rate.
        eps: eq. 8's ``ε_g``.
        start_mean: starts averaging a tensor over ranks and returns the call that waits
            for the mean (``sharding.dmp.start_all_reduce_mean``; by default one process);
            passed in so this module needs no process group.

    As a loop hook it starts the average between forward and backward
    (``after_forward``), so the reduction travels while the backward runs, and applies
    the update after the step (``after_step``): the same update, without a blocking
    all-reduce of its own.
    """

    def __init__(
        self,
        alpha: nn.Parameter,
        lr: float = 1e-2,
        eps: float = 1e-7,
        start_mean: Optional[Callable[[torch.Tensor], Callable[[], torch.Tensor]]] = None,
    ) -> None:
        self.alpha = alpha
        self.eps = eps
        self.start_mean = start_mean or (lambda t: lambda: t)
        self.optimizer = torch.optim.Adam([alpha], lr=lr)
        self._pending: Optional[Callable[[], torch.Tensor]] = None

    def step(self, grad_alpha: torch.Tensor) -> None:
        """One α update from this rank's gradient."""
        self._update(self.start_mean(grad_alpha.detach().clone())())

    def _update(self, grad: torch.Tensor) -> None:
        self.alpha.grad = normalize_rows(grad, self.eps)
        self.optimizer.step()
        self.alpha.grad = None
        with torch.no_grad():
            self.alpha.clamp_(0.0, 1.0)

    def after_forward(self, outputs: dict[str, torch.Tensor]) -> None:
        """Loop hook before the backward: start averaging the step's α gradient."""
        if "grad_alpha" in outputs:
            self._pending = self.start_mean(outputs["grad_alpha"].detach().clone())

    def after_step(self, outputs: dict[str, torch.Tensor]) -> None:
        """Loop hook: update α when the step produced a gradient."""
        if self._pending is None and "grad_alpha" in outputs:  # a caller without after_forward
            self.after_forward(outputs)
        if self._pending is not None:
            wait, self._pending = self._pending, None
            self._update(wait())

    def metrics(self) -> dict[str, list[float]]:
        """Mean α of every row (block), for the metrics log."""
        return {"alpha_row_mean": [round(v, 4) for v in self.alpha.detach().mean(1).tolist()]}

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
