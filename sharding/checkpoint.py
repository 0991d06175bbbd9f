"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded tables reshard on load.

A checkpoint is a folder: DCP's files for the model (and optionally optimizer) state,
plus ``extra.pt`` (loop position, α optimizer, anything small and replicated) written by
rank 0. It is written under ``<name>.tmp`` and renamed once every rank has finished, so
a folder without the suffix is always complete.

Example:
    >>> save_checkpoint(run / "checkpoints/step_100", dmp, optimizer, {"step": 100})  # doctest: +SKIP
    >>> extra = load_checkpoint(run / "checkpoints/step_100", dmp, optimizer)          # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from sharding.shard_pieces import is_sharded, local_pieces

EXTRA_FILE = "extra.pt"
LATEST_FILE = "latest"


class CheckpointMismatch(ValueError):
    """The checkpoint lacks some of the model's weights: the user's to fix (wrong run or
    config), reported in one line."""


def check_matches(directory: Path, model_state: dict[str, Any]) -> None:
    """Raise ``CheckpointMismatch`` unless ``directory`` holds every weight of
    ``model_state`` at its (global) shape."""
    stored = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    missing = [key for key in model_state if f"model.{key}" not in stored]
    if missing:
        raise CheckpointMismatch(
            f"{directory}: no {missing[0]} (and {len(missing) - 1} more of the model's weights): the checkpoint "
            f"holds another model (another config, or a version before its names changed)"
        )
    for key, value in model_state.items():
        size = getattr(stored[f"model.{key}"], "size", None)  # tensors only; sharded ones by their global size
        if size is not None and hasattr(value, "size") and tuple(size) != tuple(value.size()):
            raise CheckpointMismatch(
                f"{directory}: {key} is {list(size)} there, {list(value.size())} in the model: the checkpoint "
                f"holds another model (another config)"
            )


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    extra: Optional[dict[str, Any]] = None,
    mark_latest: bool = True,
) -> Path:
    """Save model (and optimizer) state from every rank into ``directory``; returns it.

    ``mark_latest`` points ``<parent>/latest`` at it (what ``--resume`` continues from).
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=str(tmp))
    if _rank() == 0:
        torch.save(extra or {}, tmp / EXTRA_FILE)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    if _rank() == 0 and mark_latest:
        latest = directory.parent / LATEST_FILE
        latest.with_suffix(".tmp").write_text(directory.name)
        os.replace(latest.with_suffix(".tmp"), latest)
    _barrier()
    return directory


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    local: bool = False,
) -> dict[str, Any]:
    """Load ``directory`` into ``model`` (any world size, sharded or not); returns ``extra``.

    The optimizer state is loaded only when ``optimizer`` is given (resuming the same
    job); across world sizes or into a new model, load the model alone. ``local``
    loads into this process alone (an unsharded model) while other ranks do other work.
    """
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory}: not a complete checkpoint (no .metadata)")
    state = {"model": model.state_dict()}
    check_matches(directory, state["model"])
    if optimizer is not None:
        if hasattr(optimizer, "init_state"):
            optimizer.init_state()  # lazily created states (Adam) must exist to be filled
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(directory), no_dist=local)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return torch.load(directory / EXTRA_FILE, weights_only=True)  # tensors and plain values only


def latest_checkpoint(checkpoints: str | Path) -> Optional[Path]:
    """The most recently completed checkpoint under ``checkpoints``, if any."""
    pointer = Path(checkpoints) / LATEST_FILE
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / ".metadata").is_file() else None


def load_full_state(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Copy whole (unsharded) tensors into ``model``, sharded or not: each local piece
    of a sharded table takes its rectangle, everything else is copied as is.

    Raises:
        ValueError: a full tensor whose shape is not its entry's global shape.
    """
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in full_state:
                continue
            source = full_state[name]
            if source.shape != tensor.shape:  # slicing or broadcasting would hide it
                raise ValueError(f"{name}: full shape {tuple(source.shape)}, the model's {tuple(tensor.shape)}")
            if not is_sharded(tensor):
                tensor.copy_(source)
            for row, col, values in local_pieces(tensor, counted_once=False):
                values.copy_(source[row : row + values.shape[0], col : col + values.shape[1]])
