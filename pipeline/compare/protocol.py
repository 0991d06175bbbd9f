"""One protocol for every method of ``dnis compare``: which stages each (method, budget,
seed) runs, in which run directories, with which training budget.

The protocol (README, "Comparing methods"):

- every method sees the same preprocessed dataset, model, K, optimisers and batch, and
  the same total training budget of ``epochs`` epochs with early stopping on validation
  loss: a method with a search phase spends ``search_epochs`` of it searching and the rest
  retraining; a method without one trains its model from scratch for all of it;
- the shipped model's embedding bytes are counted one way for all (``plans.bytes``
  and the QR and quantisation formulas next to it): values, range starts, projections,
  COO indices, scales and biases; MLP bytes are left out;
- choices between candidates (grid widths, random plans) use the validation loss only;
  the test split is read once per run, by the stage's final evaluation;
- every cell runs with ``seeds`` seeds (``run.seed``: initialisation and batch order).

Methods and their stages (``E`` = epochs, ``s`` = search_epochs):

==============================  ==============================================================
``full``                        train E (the unpruned reference, CR 1)
``grid``                        train E at each uniform width K' of ``grid`` and the widest
                                that fits each budget (K // CR); per budget the fitting K' with
                                the lowest validation loss
``random``                      ``candidates`` random descending per-block width plans per
                                budget, each trained E from scratch; the best on validation
``mde``                         the MDE plan for the budget, trained E from scratch
``nis_me``                      ``dnis nis`` for s epochs (RL controller), its plan retrained
                                from scratch for E - s
``magnitude``                   train s, column-structured magnitude prune, retrain E - s
``magnitude_fine``              train s, entry-wise magnitude prune (COO bytes), no retrain
``qr``                          QR embeddings with collisions for the budget, trained E
``int8`` / ``int4``             ``full`` quantised row-wise after training (CR ≈ 4 / 8)
``dnis``                        search s, structured prune (one τ, widths in steps of 4),
                                retrain E - s
``dnis_value``                  as ``dnis``, the prune allocating columns by worth per byte
                                (``pipeline.prune.knapsack``, any width)
``dnis_ladder``                 as ``dnis_value``, widths only 1, 2, 4, ..., K
                                (``knapsack.doubling_widths``: fewer column slabs to serve)
``dnis_shared``                 as ``dnis_value``, ids of groups seen fewer than c times on
                                average sharing rows (hashing), one prune and retrain per c
                                of ``min_row_lookups``; the best on validation
``dnis_shared_ladder``          as ``dnis_shared``, widths only 1, 2, 4, ..., K
``dnis_shared_half``            as ``dnis_shared``, widths only 1, 2, 4, ..., K/2: a served
                                model's first layer reads at most K/2 columns per field
``dnis_shared_narrow``          the same up to K/4
``dnis_shared_half_me``         as ``dnis_shared_half`` (``_ladder_me``: ``_ladder``), the plan
                                sized for and retrained with the learned (NIS-ME) projection
``dnis_shared_half_pca``        as ``dnis_shared_half_me`` (``_ladder_pca``: ``_ladder_me``) on
                                each feature's principal columns (``pipeline.prune.basis``),
                                the learned projection starting as the turn back
``dnis_shared_int8``            as ``dnis_shared``, widths 2, 4, ..., K, the budget counted in
                                INT8 bytes (``knapsack``'s ``bits``); chosen on fp32
                                validation, evaluated quantized to INT8
``dnis_shared_half_int8_pca``   as ``dnis_shared_half_pca``, widths 2, 4, ..., K/2, the
                                budget counted in INT8 bytes, evaluated quantized to INT8
``dnis_fine``                   search s, eq. 9 prune (COO bytes), no retrain
``dnis_int8``                   ``dnis``'s retrained model quantised to int8 (compound CR)
==============================  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pipeline.config import load_config

METHODS = (
    "full", "grid", "random", "mde", "nis_me", "magnitude", "magnitude_fine", "qr",
    "int8", "int4", "dnis", "dnis_value", "dnis_ladder", "dnis_shared", "dnis_shared_ladder",
    "dnis_shared_half", "dnis_shared_narrow", "dnis_shared_ladder_me", "dnis_shared_half_me", "dnis_shared_ladder_pca",
    "dnis_shared_half_pca", "dnis_shared_int8", "dnis_shared_half_int8_pca", "dnis_fine", "dnis_int8",
)
# dnis_shared and its variants: one prune and retrain per min_row_lookups candidate.
SHARED_METHODS = ("dnis_shared", "dnis_shared_ladder", "dnis_shared_half", "dnis_shared_narrow",
                  "dnis_shared_ladder_me", "dnis_shared_half_me", "dnis_shared_ladder_pca", "dnis_shared_half_pca",
                  "dnis_shared_int8", "dnis_shared_half_int8_pca")
# Methods whose CR is set by their model or number format, not by the budget (None:
# whatever the quantised rows give).
FIXED_CR = {"full": 1.0, "int8": None, "int4": None}


@dataclass(frozen=True)
class Settings:
    """What one ``dnis compare`` runs; every field is a command-line option."""

    configs: tuple[str, ...]
    data: dict[str, str]  # dataset name -> preprocessed path
    models: tuple[str, ...]
    methods: tuple[str, ...]
    crs: tuple[float, ...]
    seeds: int
    out: str
    epochs: int = 2
    search_epochs: int = 1
    grid: tuple[int, ...] = (1, 2, 4, 8, 16)
    candidates: int = 4
    mde_temperature: float = 0.3
    min_row_lookups: tuple[float, ...] = (0, 10, 30, 100)
    nproc: int = 2
    scheduler: str = "local_cwd"
    overrides: tuple[str, ...] = ()


@dataclass
class Step:
    """One stage run: ``command`` (argv) unless ``done()``; ``prepare`` runs in this
    process first (writing a baseline's plan). ``succeeded`` (default ``done``) checks
    the output after the run: a prune is done once its retrain is, but succeeds when
    it wrote its plan."""

    name: str
    done: Callable[[], bool]
    command: list[str] = field(default_factory=list)
    prepare: Optional[Callable[[], None]] = None
    log: Optional[Path] = None
    succeeded: Optional[Callable[[], bool]] = None


@dataclass(frozen=True)
class Cell:
    """One (dataset, model, seed) of a compare: its directory and its base overrides."""

    settings: Settings
    data: str
    model: str
    seed: int

    @property
    def root(self) -> Path:
        return Path(self.settings.out) / self.data / self.model / f"seed{self.seed}"

    def dir(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def overrides(self, run_dir: Path, epochs: int, *extra: str) -> list[str]:
        """Config overrides of a run of this cell (the compare's own come first)."""
        return [
            *self.settings.overrides, f"data.path={self.settings.data[self.data]}",
            f"model.name={self.model}", f"run.seed={self.seed}", f"run.dir={run_dir}",
            f"train.epochs={epochs}", *extra,
        ]

    def embedding_dim(self) -> int:
        """``K`` of this cell's resolved config."""
        return load_config(list(self.settings.configs), self.overrides(self.root, self.settings.epochs)).model.embedding_dim

    def grid_widths(self, embedding_dim: int) -> tuple[int, ...]:
        """The grid baseline's uniform widths K': ``grid`` plus, per budget, the widest
        that fits (``K // CR``), so uniform is always offered the bytes the others get
        (K = 32 at CR 10: K' = 3 joins a grid of 1, 2, 4, ...)."""
        fitting = {int(embedding_dim // cr) for cr in self.settings.crs if embedding_dim >= cr}
        return tuple(sorted(set(self.settings.grid) | fitting))

    @property
    def retrain_epochs(self) -> int:
        return self.settings.epochs - self.settings.search_epochs


def cr_tag(cr: float) -> str:
    """Directory name of a budget: ``cr10``, ``cr12.5``."""
    return f"cr{cr:g}"
