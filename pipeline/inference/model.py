"""The shipped model as one ``nn.Module``, from raw Criteo rows to click probabilities.

``load_model(path)`` rebuilds an exported model (``dnis export``: a retrain run's repacked
mixed-width tables, or a train run's full tables) from its artifact directory
(``pipeline.inference.artifact``: JSON and safetensors, nothing unpickled) in this
process alone: no process group, no sharding. The module owns every step the training
data went through: vocabulary lookup (hex -> frequency rank, OOV; for a repacked model
its serving id), the dense transform (``log(1 + max(x, 0))``), the ids into the repacked
tables, the tables and their projections, and the model. The code is the preprocessing's and the loader's own
(``encode_columns``, ``key_ids``), so serving cannot drift from training.
``encode`` is the numpy part (raw rows -> dense values and ids), ``forward`` the tensor
part (dense values and ids -> logits), which ``torch.export`` exports with a dynamic
batch (``pipeline.inference.exported``).

Every table is served by TorchRec's inference EBC (``quantize_inference_model``: FBGEMM's
inference TBE, all tables in one kernel call), with fp32 rows (exactly the trained
values) or, with ``bits=8`` or ``bits=4``, rows quantized row-wise to INT8/INT4 (an
entry's error is at most half its row's ``(max - min) / (2^bits - 1)`` plus fp16 rounding
of the row's scale and bias; bytes as ``plans.bytes`` counts them; a table too narrow
to quantize, such as a width-1 slab at INT8, keeps its fp32 rows). A repacked
model is served with its own id numbering (``sharding.serving_rows``: the vocabulary maps
raw values straight to serving ids, and each column slab stores a prefix of them, so the
ids reach the slabs with one ``minimum`` each), and where it costs less an FM, DeepFM or
Wide & Deep reads its pooled slab columns directly (``pipeline.models.folded``): the
selection or learned projection is folded into the first layers, so the mostly-zero
``[B, F, K]`` fields are never built; the weighted dense keys' one-row tables then leave
the TBE, their pooled columns computed from the dense values (``fold_dense_keys``).
Serving reads one id per categorical field: a run trained on multi-hot bags
(``data.multi_hot_sizes``) is refused (``multi_hot_refusal``).

Example:
    >>> model = load_model("runs/synthetic/search/retrain")          # doctest: +SKIP
    >>> for _, block in read_tsv("new_rows.tsv"):                     # doctest: +SKIP
    ...     probabilities = model.predict(block)   # == torch.sigmoid(model(*model.encode(block)))
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.inference.modules import quantize_inference_model
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    quant_prep_customize_row_alignment, quant_prep_enable_cache_features_order,
)

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import DataConfig, load_config
from pipeline.data.chunk_passes import encode_columns
from pipeline.data.criteo_reader import ParsedBlock
from pipeline.data.features import FeatureLayout
from pipeline.data.loader import key_ids
from pipeline.data.vocab import Vocabulary
from pipeline.inference.artifact import (
    EXPORT_DIR, MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE, Artifact, ArtifactError, check_weights, read_artifact,
)
from pipeline.models.folded import FoldedInteraction
from pipeline.tasks import build_retrain_task, build_train_task
from plans.bytes import QUANT_ROW_ALIGNMENT, quantizes
from plans.structured import StructuredPlan
from sharding.column_slabs import ColumnSlabs
from sharding.kjt import single_hot_kjt
from sharding.serving_rows import ServingRows, orthonormal_projections

FP32_BITS = 32
# TorchRec's names for FP32 / INT8 / INT4 rows.
TABLE_DTYPES = {FP32_BITS: torch.float, 8: torch.qint8, 4: torch.quint4x2}


class ServingModel(nn.Module):
    """Raw rows -> logits: ``encode`` (numpy, the preprocessing's code), then ``forward``.

    Args:
        model: the trained model, ``model(dense, sparse) -> logits``.
        layout: the run's feature layout (keys, dense mode).
        vocab: the vocabulary ``encode`` uses (a repacked model's maps to its serving ids).
        dense_fields: the integer fields, in ``Batch.dense`` column order.
        rewrite: the repacked model's serving ids -> slabs (``None`` for full tables).
        folded: the repacked model's interaction read from its pooled slab columns
            (``CTRModel.folded``), or ``None`` to run ``model`` as trained.
    """

    def __init__(
        self, model: nn.Module, layout: FeatureLayout, vocab: Vocabulary,
        dense_fields: Sequence[str], rewrite: Optional[ServingRows] = None,
        folded: Optional[FoldedInteraction] = None,
    ) -> None:
        super().__init__()
        self.model, self.folded = model, folded
        self.layout, self.vocab, self.rewrite = layout, vocab, rewrite
        # Folded dense keys (``fold_dense_keys``): the slab KJT is built from the id columns alone.
        self.ids_only = folded is not None and folded.dense_map is not None
        self.dense_fields = tuple(dense_fields)
        self._keys_checked = False
        self.eval()

    def encode(self, block: ParsedBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dense [B, D] float32, ids [B, C] int64)`` of raw rows, exactly as the
        preprocessing and the loader make them (``D`` dense fields, ``C`` id columns)."""
        dense = np.stack(encode_columns(block, self.vocab, self.dense_fields), 1)
        ids = np.stack(encode_columns(block, self.vocab, self.layout.id_columns), 1).astype(np.int64)
        return torch.from_numpy(dense), torch.from_numpy(ids)

    def from_ranks(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids ``forward`` reads of frequency ranks ``[B, C]`` (a preprocessed
        dataset's id columns): themselves, or a repacked model's serving ids."""
        return ids if self.rewrite is None else self.rewrite.serving_ids(ids.T, self.layout.id_columns).T

    def features(self, dense: torch.Tensor, ids: torch.Tensor, check: bool = True) -> KeyedJaggedTensor:
        """The KJT the model reads: every key single-hot (``key_ids``), or a repacked
        model's slabs (serving ids checked against their ranges unless ``check=False``;
        without the dense keys' where ``fold_dense_keys`` folded them)."""
        if self.ids_only:
            return self.rewrite(ids.T, None, check)
        ids, weights = key_ids(dense, ids.T, self.layout)
        if self.rewrite is None:
            return single_hot_kjt(self.layout.keys, ids, weights)
        return self.rewrite(ids, weights, check)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of encoded rows (``encode``): the tensor part of serving."""
        return self.logits(dense, ids)

    def logits(self, dense: torch.Tensor, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """``forward``; ``check=False`` for ids of ``encode`` (the vocabulary's: in range)."""
        sparse = self.features(dense, ids, check)
        if self.folded is None:
            return self.model(dense, sparse)
        pooled = self.model.embedding.ebc(sparse)
        if not self._keys_checked:  # the order output_map's rows are in: fixed by the first call
            if pooled.keys() != self.rewrite.out_keys:
                raise RuntimeError(f"pooled keys {pooled.keys()} are not the slabs' {self.rewrite.out_keys}")
            self._keys_checked = True
        return self.folded(dense, pooled.values())

    def rank_logits(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``forward`` of a loader batch (``Batch.dense``, ``Batch.sparse``: every key
        single-hot, ids as frequency ranks): a preprocessed split scored as served."""
        ranks = sparse.values().long().view(len(self.layout.keys), -1)[len(self.layout.dense_keys):]
        return self.logits(dense, self.from_ranks(ranks.T))

    @torch.no_grad()
    def predict(self, block: ParsedBlock) -> torch.Tensor:
        """Click probabilities of raw rows (in eval mode: ``eval()`` visits every module,
        80 µs of a 0.8 ms call at batch 1, so only when something set training mode).
        The vocabulary's ids need no range check (2 of a repacked request's ops)."""
        if self.training:
            self.eval()
        return torch.sigmoid(self.logits(*self.encode(block), check=False))

    def embedding_bytes(self) -> int:
        """Bytes held by the embedding module (tables, quantization scales, projections)
        and the serving ids' buffers (``ServingRows``)."""
        modules = [self.model.embedding] + ([self.rewrite] if self.rewrite is not None else [])
        tables = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
        return tables + (self.folded.dense_row_bytes if self.ids_only else 0)


def load_model(path: str | Path, bits: Optional[int] = None) -> ServingModel:
    """The exported model (``dnis export``) on CPU in this process, ready to score raw rows.

    ``path`` is an artifact directory or a run directory holding one in ``model/``
    (a finished retrain or train run exports its best model there). Only JSON and
    safetensors are read, each file checked against the manifest first: nothing is
    unpickled. ``bits`` (8 or 4) quantizes its tables (``inference_tables``).

    Raises:
        ArtifactError: naming the missing, changed or malformed file (and key).

    Example:
        >>> model = load_model("runs/synthetic/search/retrain", bits=8)  # doctest: +SKIP
    """
    return serve_artifact(read_artifact(artifact_directory(path)), bits)


def serve_artifact(artifact: Artifact, bits: Optional[int] = None, fold: bool = True) -> ServingModel:
    """The model of ``artifact`` (read from disk, or a run's checkpoint in memory:
    ``launch.export.load_run``) on CPU, ready to serve; ``bits`` as ``load_model``,
    ``fold`` as ``serving_model``.

    Raises:
        ArtifactError: naming ``model.json`` if no model can be built from it (or it was
            trained multi-hot), or the tensor whose name, dtype or shape the model does not have.
    """
    cfg, layout, directory = artifact.config, artifact.layout, Path(artifact.directory or ".")
    refused = multi_hot_refusal(cfg.data)
    if refused:
        raise ArtifactError(f"{directory / MODEL_FILE}: {refused}")
    try:
        if artifact.plan is not None:
            task = build_retrain_task(cfg, layout, artifact.plan, artifact.projection, torch.device("cpu"))
        else:
            task = build_train_task(cfg, layout, torch.device("cpu"))
    except (IndexError, KeyError, TypeError, ValueError) as error:  # values of the wrong kind in model.json
        reason = f"{type(error).__name__}: {error}"
        raise ArtifactError(f"{directory / MODEL_FILE}: no model can be built from it ({reason})") from None
    check_weights(directory / WEIGHTS_FILE, artifact.weights, task.state_dict())
    task.load_state_dict(artifact.weights)
    return serving_model(task.model, layout, artifact.vocab, artifact.dense_fields, artifact.plan, bits, fold)


def artifact_directory(path: str | Path) -> Path:
    """``path`` if it holds an exported model, else its ``model/`` (a run directory's export).

    Raises:
        ArtifactError: for a run directory that was never exported, or cannot be (multi-hot).
    """
    path = Path(path)
    if (path / MANIFEST_FILE).is_file() or not (path / "config.yaml").is_file():
        return path  # an artifact, or a path whose error read_artifact names
    exported = path / EXPORT_DIR
    if not (exported / MANIFEST_FILE).is_file():
        refused = multi_hot_refusal(load_config([path / "config.yaml"]).data)
        raise ArtifactError(
            f"{path}: {refused}" if refused else
            f"{path}: no exported model in {exported}; run `dnis export --run-dir {path}`"
        )
    return exported


def multi_hot_refusal(data: DataConfig) -> Optional[str]:
    """Why a model trained with ``data`` cannot be served, or ``None``: serving reads one
    id per categorical field, and a multi-hot run's fields took bags of ids."""
    if not data.multi_hot:
        return None
    return ("data.multi_hot_sizes is on (trained on multi-hot bags); serving (dnis export, "
            "load_model, dnis predict) reads one id per categorical field")


def serving_model(
    model: nn.Module, layout: FeatureLayout, vocab: Vocabulary, dense_fields: Sequence[str],
    plan: Optional[StructuredPlan] = None, bits: Optional[int] = None, fold: bool = True,
) -> ServingModel:
    """A trained model (on CPU, changed in place) ready to serve: its tables in TorchRec's
    inference EBC (``inference_tables``: fp32, or ``bits`` 8 or 4); a repacked model's
    (``plan``) re-laid for its serving ids (``ServingRows``, which its vocabulary then maps
    raw values to), and with ``fold`` its interaction folded onto the pooled slab columns
    where the model allows (``pipeline.models.folded``) and its weighted dense keys taken
    out of the tables (``fold_dense_keys``); ``fold=False`` runs the model's own
    interaction on its fields."""
    bits = FP32_BITS if bits is None else bits
    if plan is None:
        return ServingModel(inference_tables(model.eval(), bits), layout, vocab, dense_fields)
    rows = ServingRows(plan, layout.keys)
    model.embedding.ebc = rows.relay(model.embedding.ebc)
    if model.embedding.learned:  # the same outputs; folded, the FM's squares become a norm
        orthonormal_projections(model.embedding)
    folded = model.folded(model.embedding.output_map()) if fold else None
    if folded is not None and folded.gram is None and layout.dense_keys:
        rows = fold_dense_keys(model.embedding, plan, layout, folded)
    model = inference_tables(model.eval(), bits)
    model.column_fold = False  # folded once above, or served on its fields: never re-folded per call
    vocab = vocab.renumbered({key: partial(rows.ids_of_ranks, key) for key in layout.id_columns})
    return ServingModel(model, layout, vocab, dense_fields, rows, None if folded is None else folded.eval())


def fold_dense_keys(
    embedding: nn.Module, plan: StructuredPlan, layout: FeatureLayout, folded: FoldedInteraction,
) -> ServingRows:
    """Take the weighted dense keys out of a folded repacked model's tables and KJT:
    ``embedding`` (its tables re-laid by ``ServingRows.relay``) keeps the id columns'
    slabs only, unweighted, and ``folded`` computes the dense keys' pooled columns
    (a one-row table's output is the dense value times its row) from the dense values
    (``FoldedInteraction.take_dense_rows``; exact fp32 rows whatever the tables' bits).
    Returns the ``ServingRows`` of the id columns, whose KJT the tables then read: one
    key per dense field fewer and no weights per request.

    Raises:
        ValueError: if the dense keys' slabs are not the first pooled columns (``layout``
            puts them first, and ``folded`` reads its columns in that order).
    """
    dense = list(layout.dense_keys)
    slabs = [s for s in ColumnSlabs(plan, layout.keys).slabs if s.key in dense]
    bags = embedding.ebc.embedding_bags
    if [c.feature_names[0] for c in embedding.ebc.embedding_bag_configs()][: len(slabs)] != [s.name for s in slabs]:
        raise ValueError("the dense keys' slabs are not the first tables of the repacked embedding")
    rows = torch.zeros(len(dense), sum(s.width for s in slabs))
    start = 0
    for s in slabs:  # a dense key stores one row (row 0), then relay's zero row
        rows[dense.index(s.key), start : start + s.width] = bags[f"t_{s.name}"].weight.detach()[0]
        start += s.width
    folded.take_dense_rows(rows)
    kept = embedding.ebc.embedding_bag_configs()[len(slabs):]
    ebc = EmbeddingBagCollection(kept, is_weighted=False, device=torch.device("cpu"))
    with torch.no_grad():
        for config in kept:
            ebc.embedding_bags[config.name].weight.copy_(bags[config.name].weight)
    embedding.ebc = ebc
    ids_plan = dataclasses.replace(plan, groups=tuple(g for g in plan.groups if g.group.key not in dense))
    return ServingRows(ids_plan, layout.id_columns)


def inference_tables(model: nn.Module, bits: int = FP32_BITS) -> nn.Module:
    """``model`` with every ``EmbeddingBagCollection`` swapped, in place, for TorchRec's
    inference EBC (``quantize_inference_model``: FBGEMM's inference TBE, fp32 outputs)
    holding fp32 rows (``bits=32``, the trained values exactly) or rows quantized
    row-wise to ``bits`` 8 or 4.

    Rows are packed without padding (``QUANT_ROW_ALIGNMENT``). A table whose width FBGEMM
    cannot quantize to ``bits`` (``plans.bytes.quantizes``: width × bits a multiple of
    16; a repacked plan's width-1 slabs at INT8) keeps fp32 rows, exact, in the same
    kernel call (``plans.bytes`` counts them so).

    Raises:
        ValueError: for other ``bits``.

    Example:
        >>> int4 = inference_tables(load_model("runs/tiny").model, bits=4)  # doctest: +SKIP
    """
    if bits not in TABLE_DTYPES:
        raise ValueError(f"bits {bits}: served tables have {', '.join(map(str, TABLE_DTYPES))} bits")
    kept_fp32 = {
        table.name: TABLE_DTYPES[FP32_BITS]
        for module in model.modules() if isinstance(module, EmbeddingBagCollection)
        for table in module.embedding_bag_configs() if not quantizes(table.embedding_dim, bits)
    }
    quant_prep_customize_row_alignment(model, [EmbeddingBagCollection], QUANT_ROW_ALIGNMENT)
    # Served KJTs always have the keys in one order: look it up once, not per batch (an
    # O(keys²) list search, 8 µs with 39 keys and 17 µs with 80 slabs at batch 1).
    quant_prep_enable_cache_features_order(model, [EmbeddingBagCollection])
    return quantize_inference_model(model, per_table_weight_dtype=kept_fp32 or None,
                                    quantization_dtype=TABLE_DTYPES[bits], output_dtype=torch.float)
