"""The shipped model as files that load without unpickling: tensors in safetensors,
everything else in JSON.

An artifact directory holds::

    model.json           resolved config, feature layout, dense fields, each vocabulary
                         field's OOV id, a repacked model's prune plan and projection,
                         where it was exported from
    weights.safetensors  the task's state dict (every tensor of the model)
    vocab.safetensors    per field ``<field>.keys`` (int64, sorted) and ``<field>.ids``
                         (int32): raw value -> frequency rank, as ``pipeline.data.vocab``
    manifest.json        bytes and sha256 of each file above (and of any extra file, such
                         as ``model.pt2``: ``pipeline.inference.exported``), written last

It is written under ``<out>.tmp`` and renamed into place, so a directory at ``<out>``
is always complete. Reading checks every file against the manifest before parsing it,
and parses only with ``json`` and safetensors, which build tensors and plain values,
never arbitrary objects (no pickle, no ``torch.load``). Any problem is an
``ArtifactError`` naming the file (and key).

Example:
    >>> write_artifact("runs/retrain/model", artifact)      # doctest: +SKIP
    >>> read_artifact("runs/retrain/model").plan.num_groups  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from pipeline.config import Config, ConfigError, config_from_dict, config_to_dict
from pipeline.data.features import FeatureLayout
from pipeline.data.vocab import FieldVocab, Vocabulary
from plans.structured import StructuredPlan

EXPORT_DIR = "model"  # a run directory's own export: <run>/model
FORMAT = "dnis-model"
# 2: repacked tables are column slabs of a nested plan (``sharding.column_slabs``); a
# version-1 artifact's per-group tables no longer fit the model its plan builds.
FORMAT_VERSION = 2
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
VOCAB_FILE = "vocab.safetensors"
MANIFEST_FILE = "manifest.json"
FILES = (MODEL_FILE, WEIGHTS_FILE, VOCAB_FILE)
HASH_BLOCK = 1 << 20


class ArtifactError(ValueError):
    """An artifact that cannot be served: ``path: reason`` (missing, changed, malformed)."""


@dataclass
class Artifact:
    """Everything ``load_model`` needs to rebuild and serve a model, and nothing else.

    Attributes:
        config: the run's resolved config (model and data sections shape the model).
        layout: the run's feature layout, without the train counts (serving never blocks).
        dense_fields: the integer fields, in ``Batch.dense`` column order.
        vocab: the dataset's vocabulary, every field (raw value -> frequency rank).
        weights: the task's state dict.
        plan, projection: a repacked (retrain) model's prune plan and projection.
        source: where it was exported from (run directory, checkpoint, stage).
        directory: where it was read from (``None`` before writing).
    """

    config: Config
    layout: FeatureLayout
    dense_fields: tuple[str, ...]
    vocab: Vocabulary
    weights: dict[str, torch.Tensor]
    plan: Optional[StructuredPlan] = None
    projection: Optional[str] = None
    source: dict[str, Any] = field(default_factory=dict)
    directory: Optional[Path] = None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(
    directory: str | Path, artifact: Artifact, extras: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write ``artifact`` to ``directory`` atomically (replacing an older one); returns it.

    ``extras`` maps more file names to functions writing them at a path; they go into the
    same directory and manifest (``read_artifact`` does not read them).
    """
    out = Path(directory)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / MODEL_FILE).write_text(json.dumps(_model_doc(artifact), indent=1, sort_keys=True))
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in artifact.weights.items()}, tmp / WEIGHTS_FILE)
    arrays = {}
    for name, vocab in artifact.vocab.fields.items():
        arrays[f"{name}.keys"] = np.ascontiguousarray(vocab.keys, dtype=np.int64)
        arrays[f"{name}.ids"] = np.ascontiguousarray(vocab.ids, dtype=np.int32)
    safetensors.numpy.save_file(arrays, tmp / VOCAB_FILE)
    extras = extras or {}
    for name, write in extras.items():
        write(tmp / name)
    names = (*FILES, *extras)
    for name in names:  # every file as readable as model.json: safetensors creates files for their owner alone
        (tmp / name).chmod((tmp / MODEL_FILE).stat().st_mode)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)} for name in names}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _replace_directory(tmp, out)
    return out


def _model_doc(artifact: Artifact) -> dict[str, Any]:
    # Serving never blocks (no counts) and is single-hot (no multi-hot bags).
    layout = {k: v for k, v in dataclasses.asdict(artifact.layout).items() if k not in ("counts", "multi_hot")}
    return {
        "config": config_to_dict(artifact.config),
        "layout": layout,
        "dense_fields": list(artifact.dense_fields),
        "vocab_oov_ids": artifact.vocab.oov_ids,
        "plan": artifact.plan.to_json() if artifact.plan is not None else None,
        "projection": artifact.projection,
        "source": artifact.source,
        "versions": {name: importlib_metadata.version(name) for name in ("torch", "torchrec", "safetensors")},
    }


def _replace_directory(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an older ``out`` is moved aside first (a directory
    cannot be replaced by rename), so ``out`` is never partly written."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_artifact(directory: str | Path) -> Artifact:
    """The verified artifact in ``directory``.

    Raises:
        ArtifactError: naming the first file (and key) that is missing, differs from the
            manifest, or does not parse.
    """
    directory = Path(directory)
    manifest = _read_json(directory / MANIFEST_FILE)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory / MANIFEST_FILE}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION} "
            "(an export of an older dnis: prune, retrain and export again)"
        )
    listed = manifest.get("files")
    for name in FILES:
        _verify(directory / name, listed.get(name) if isinstance(listed, dict) else None)
    model_path = directory / MODEL_FILE
    doc = _read_json(model_path)
    try:
        config = config_from_dict(_key(doc, "config", model_path), str(model_path))
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in _key(doc, "layout", model_path).items()}
        # model.json sorts its keys; the tables go in key order, as trained (else every
        # batch is permuted to the tables' order and back).
        fields["num_embeddings"] = {key: fields["num_embeddings"][key] for key in fields["keys"]}
        layout = FeatureLayout(**fields, counts={})
        plan_doc = _key(doc, "plan", model_path)
        plan = StructuredPlan.from_json(plan_doc) if plan_doc is not None else None
        dense_fields = tuple(_key(doc, "dense_fields", model_path))
        oov_ids = {str(name): int(oov_id) for name, oov_id in _key(doc, "vocab_oov_ids", model_path).items()}
    except ArtifactError:
        raise
    except ConfigError as error:  # already names the file and key
        raise ArtifactError(str(error)) from None
    except (AttributeError, TypeError, ValueError, KeyError) as error:  # a document of the wrong shape
        raise ArtifactError(f"{model_path}: {type(error).__name__}: {error}") from None
    return Artifact(
        config=config, layout=layout, dense_fields=dense_fields,
        vocab=_read_vocab(directory / VOCAB_FILE, oov_ids),
        weights=_read_safetensors(directory / WEIGHTS_FILE, safetensors.torch.load_file),
        plan=plan, projection=_key(doc, "projection", model_path), source=doc.get("source", {}),
        directory=directory,
    )


def verify_listed(path: Path) -> None:
    """Check the file ``path`` against the manifest of its directory.

    Raises:
        ArtifactError: for a missing manifest or file, an unlisted file or one that changed.
    """
    listed = _read_json(path.parent / MANIFEST_FILE).get("files")
    _verify(path, listed.get(path.name) if isinstance(listed, dict) else None)


def check_weights(path: Path, weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse ``weights`` unless they hold exactly ``expected``'s keys, dtypes and shapes.

    Raises:
        ArtifactError: ``path: tensor 'k': ...`` for the first difference.
    """
    for key in sorted(expected.keys() | weights.keys()):
        if key not in weights:
            raise ArtifactError(f"{path}: no tensor {key!r}, which the model needs")
        if key not in expected:
            raise ArtifactError(f"{path}: tensor {key!r} is not part of the model")
        got, want = weights[key], expected[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ArtifactError(
                f"{path}: tensor {key!r} is {got.dtype} {list(got.shape)}, "
                f"the model needs {want.dtype} {list(want.shape)}"
            )


def _verify(path: Path, record: Any) -> None:
    if not isinstance(record, dict) or not {"bytes", "sha256"} <= record.keys():
        raise ArtifactError(f"{path}: not listed in {MANIFEST_FILE}")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (listed in {MANIFEST_FILE})")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(f"{path}: {size} bytes, {MANIFEST_FILE} says {record['bytes']} (truncated or replaced)")
    if sha256_of(path) != record["sha256"]:
        raise ArtifactError(f"{path}: sha256 differs from {MANIFEST_FILE} (changed or corrupt)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        hint = "; not a finished export (run `dnis export`)" if path.name == MANIFEST_FILE else ""
        raise ArtifactError(f"{path}: missing{hint}")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path}: not JSON ({error})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    return doc


def _key(doc: dict[str, Any], key: str, path: Path) -> Any:
    if key not in doc:
        raise ArtifactError(f"{path}: no key {key!r}")
    return doc[key]


def _read_safetensors(path: Path, load: Callable[[str], dict]) -> dict:
    try:
        return load(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{path}: not a readable safetensors file ({error})") from None


def _read_vocab(path: Path, oov_ids: dict[str, int]) -> Vocabulary:
    arrays = _read_safetensors(path, safetensors.numpy.load_file)
    fields = {}
    for name, oov_id in oov_ids.items():
        for part, dtype in (("keys", np.int64), ("ids", np.int32)):
            array = arrays.get(f"{name}.{part}")
            if array is None or array.dtype != dtype or array.ndim != 1:
                raise ArtifactError(f"{path}: no 1-d {np.dtype(dtype)} array {name}.{part}")
        keys, ids = arrays[f"{name}.keys"], arrays[f"{name}.ids"]
        if keys.size != ids.size:
            raise ArtifactError(f"{path}: {name}.keys and {name}.ids differ in length")
        fields[name] = FieldVocab(keys=keys, ids=ids, oov_id=oov_id)
    return Vocabulary(fields)
