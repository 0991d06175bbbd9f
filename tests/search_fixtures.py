"""Tiny α-EBC search models and batches shared by the search tests.

Three cases cover what Criteo and other logs need: single-hot tables of different
sizes, a multi-hot feature split per block, and weighted one-row tables (the paper's
dense features).
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.config import ModelConfig
from pipeline.data.batch import Batch
from pipeline.models import build_model
from pipeline.search.blocking import compute_blocking
from pipeline.search.dnis import DNISTask
from sharding.alpha_ebc import AlphaEmbeddingBagCollection, split_multi_hot
from sharding.field_embedding import table_configs

K = 16
NUM_BLOCKS = 3
TRAIN_ROWS, VAL_ROWS = 6, 4

CASES = {
    "single": dict(nums={"a": 50, "b": 20, "c": 7}, multi=[], weighted=[]),
    "multi": dict(nums={"a": 50, "m": 30, "c": 7}, multi=["m"], weighted=[]),
    "weighted": dict(nums={"a": 50, "b": 20, "d": 1}, multi=[], weighted=["d"]),
}


def case_blocking(case: str):
    nums = CASES[case]["nums"]
    # A skewed count profile per table: ids are frequency ranks.
    counts = {k: [[100 // (i + 1) + 1, 1] for i in range(n)] for k, n in nums.items()}
    counts = {k: _merge_runs(v) for k, v in counts.items()}
    return compute_blocking(counts, NUM_BLOCKS)


def _merge_runs(rle):
    out = []
    for count, run in rle:
        if out and out[-1][0] == count:
            out[-1][1] += run
        else:
            out.append([count, run])
    return out


def build_task(case: str, device: torch.device, model_name: str = "deepfm", seed: int = 0) -> DNISTask:
    """A DNIS task on a fresh α-EBC (real weights on CPU, or ``meta`` for sharding)."""
    spec = CASES[case]
    torch.manual_seed(seed)
    configs = table_configs(spec["nums"], K, 0.1, spec["multi"], NUM_BLOCKS)
    ebc = EmbeddingBagCollection(configs, is_weighted=bool(spec["weighted"]), device=device)
    embedding = AlphaEmbeddingBagCollection(ebc, case_blocking(case), spec["multi"])
    cfg = ModelConfig(name=model_name, embedding_dim=K, mlp_dims=(8,), bottom_mlp_dims=(8,))
    model = build_model(cfg, embedding, num_fields=len(spec["nums"]), num_dense=3)
    return DNISTask(model, train_rows=TRAIN_ROWS)


def make_batch(case: str, seed: int, rows: int = TRAIN_ROWS + VAL_ROWS) -> Batch:
    """A deterministic batch for ``case`` (multi-hot keys already split per block)."""
    spec = CASES[case]
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths, weights = [], [], [], []
    for key, n in spec["nums"].items():
        if key in spec["multi"]:
            length = torch.randint(0, 4, (rows,), generator=g)
        else:
            length = torch.ones(rows, dtype=torch.int64)
        keys.append(key)
        lengths.append(length)
        values.append(torch.randint(0, n, (int(length.sum()),), generator=g))
        w = torch.rand(int(length.sum()), generator=g) if key in spec["weighted"] else None
        weights.append(w if w is not None else torch.ones(int(length.sum())))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys, torch.cat(values), torch.cat(lengths),
        weights=torch.cat(weights) if spec["weighted"] else None,
    )
    if spec["multi"]:
        kjt = split_multi_hot(kjt, case_blocking(case), spec["multi"])
    dense = torch.rand(rows, 3, generator=g)
    labels = (torch.rand(rows, generator=g) < 0.4).float()
    return Batch(dense, kjt, labels)
