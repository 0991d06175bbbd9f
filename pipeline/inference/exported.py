"""The served model's tensor part as a ``torch.export`` program with a dynamic batch.

``export_program(model)`` exports ``ServingModel.forward``: dense values ``[B, D]`` and
ids ``[B, C]`` (what ``ServingModel.encode`` makes of raw rows) -> logits ``[B]``, for any
``B`` (1 included), the serving ids' slab lookup, tables and model in one graph, fp32 or with
quantized tables. ``dnis export --exported`` writes it as ``model.pt2`` into the artifact
directory, listed in its manifest. The safetensors artifact stays the shipped form:
``torch.export.load`` unpickles part of a ``.pt2`` (its example inputs), so
``load_program`` is for files from a trusted source.

Example:
    >>> program = export_program(load_model("runs/synthetic/search/retrain"))  # doctest: +SKIP
    >>> program.module()(*model.encode(block))                                 # doctest: +SKIP
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram
from torchrec.pt2.utils import register_fake_classes

from pipeline.inference.artifact import verify_listed
from pipeline.inference.model import ServingModel

PROGRAM_FILE = "model.pt2"
# Traced with this many rows; 0 and 1 would be specialised, any other size generalises.
EXAMPLE_ROWS = 8


@functools.cache
def _fake_fbgemm_classes() -> None:
    """FBGEMM's inference TBE holds TorchScript objects (counters) that ``torch.export``
    must fake; TorchRec registers the fakes (once per process)."""
    register_fake_classes()


def export_program(model: ServingModel) -> ExportedProgram:
    """``model.forward`` exported (non-strict) with a dynamic batch dimension.

    Example:
        >>> export_program(load_model(path)).module()(dense, ids)   # doctest: +SKIP
    """
    _fake_fbgemm_classes()
    dense = torch.zeros(EXAMPLE_ROWS, len(model.dense_fields))
    ids = torch.zeros(EXAMPLE_ROWS, len(model.layout.id_columns), dtype=torch.int64)  # id 0 is in every table
    batch = Dim("batch", min=1)
    model.eval()
    with torch.no_grad():
        model(dense, ids)  # TorchRec's inference EBC caches its keys' order on its first call, outside the trace
        return torch.export.export(
            model, (dense, ids), dynamic_shapes={"dense": {0: batch}, "ids": {0: batch}}, strict=False,
        )


def load_program(directory: str | Path) -> ExportedProgram:
    """The program in ``directory/model.pt2``, checked against the artifact's manifest.

    Unpickles (``torch.export.load``): load programs from a trusted source only.

    Raises:
        ArtifactError: for a missing, unlisted or changed file.
    """
    path = Path(directory) / PROGRAM_FILE
    verify_listed(path)
    return torch.export.load(path)
