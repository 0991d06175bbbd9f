"""Layered YAML configuration loaded into frozen dataclasses.

A config file may name a parent with ``extends: base.yaml`` (relative to itself);
the child's keys override the parent's, section by section. ``key=value``
overrides (``train.max_steps=100``) are applied last. An unknown section or key
is an error that names the key and the file it came from.

Example:
    >>> cfg = load_config(["configs/tiny.yaml"], ["train.max_steps=5"])
    >>> cfg.train.max_steps
    5
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names key and source."""


MULTI_HOT_DISTRIBUTIONS = ("uniform", "pareto")
ALPHA_GRAD_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class DataConfig:
    """Where the preprocessed dataset lives and how batches are cut from it."""

    path: str = "runs/data/synthetic"
    batch_size: int = 4096  # train rows per step, per rank (TorchRec DLRM convention)
    eval_batch_size: int = 16384  # per rank
    dense_mode: str = "embedding"  # embedding (paper) | mlp (DLRM bottom MLP) | bucket
    shuffle: bool = True
    prefetch: int = 2  # batches prepared ahead by a background thread
    # Rows of the tables of C1..Cn when the dataset at ``path`` is absent: ``dnis plan``
    # plans from these (e.g. Criteo 1TB's published sizes); training always reads metadata.
    table_sizes: tuple[int, ...] = ()
    # MLPerf's synthetic multi-hot variant: one bag size per categorical field C1..Cn
    # (1 = single-hot); empty = off. See pipeline.data.multi_hot.
    multi_hot_sizes: tuple[int, ...] = ()
    multi_hot_distribution: str = "uniform"  # uniform | pareto: how the extra ids are drawn

    def __post_init__(self) -> None:
        if any(size < 1 for size in self.multi_hot_sizes):
            raise ConfigError(f"data.multi_hot_sizes must all be >= 1, got {list(self.multi_hot_sizes)}")
        if self.multi_hot_distribution not in MULTI_HOT_DISTRIBUTIONS:
            raise ConfigError(
                f"data.multi_hot_distribution {self.multi_hot_distribution!r}: expected one of {MULTI_HOT_DISTRIBUTIONS}"
            )

    @property
    def multi_hot(self) -> bool:
        """Whether some categorical field is expanded to bags of several ids."""
        return any(size > 1 for size in self.multi_hot_sizes)


EMBEDDINGS = ("full", "qr")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build and its sizes; see ``pipeline.models.MODELS``."""

    name: str = "deepfm"
    embedding_dim: int = 64
    init_scale: float = 0.01  # every table starts from uniform(-s, s), whatever its size
    mlp_dims: tuple[int, ...] = (400, 400, 400)
    bottom_mlp_dims: tuple[int, ...] = (512, 256)  # dense_mode=mlp; a last layer of K is added
    cross_layers: int = 3  # DCNv2
    cross_rank: int = 0  # DCNv2 low-rank cross (0 = full rank)
    embedding: str = "full"  # full | qr (quotient-remainder baseline, pipeline.search.qr)
    qr_target_cr: float = 0.0  # qr: unpruned ÷ QR embedding bytes to aim for (> 1)
    qr_min_rows: int = 1000  # qr: tables of at most this many rows stay full

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ConfigError(f"model.embedding {self.embedding!r}: expected one of {EMBEDDINGS}")
        if self.embedding == "qr" and self.qr_target_cr <= 1.0:
            raise ConfigError(f"model.qr_target_cr must be > 1 with model.embedding=qr, got {self.qr_target_cr}")
        if self.qr_min_rows < 1:
            raise ConfigError(f"model.qr_min_rows must be >= 1, got {self.qr_min_rows}")


@dataclass(frozen=True)
class BlockingConfig:
    """Frequency blocking of features (paper section 2.3)."""

    num_blocks: int = 6
    mode: str = "equal_mass"  # equal_mass | equal_count
    per_field: bool = False


@dataclass(frozen=True)
class SearchConfig:
    """DNIS search (paper Algorithm 1, first order)."""

    alpha_lr: float = 1e-2
    val_batch_size: int = 1024  # validation rows per search step, per rank
    alpha_interval: int = 1  # update alpha every this many steps
    grad_norm_eps: float = 1e-7  # eq. 8
    alpha_grad_dtype: str = "auto"  # validation rows' pass: auto | float32 | bfloat16

    def __post_init__(self) -> None:
        if self.alpha_grad_dtype not in ALPHA_GRAD_DTYPES:
            raise ConfigError(
                f"search.alpha_grad_dtype {self.alpha_grad_dtype!r}: expected one of {ALPHA_GRAD_DTYPES}"
            )


@dataclass(frozen=True)
class NISConfig:
    """NIS-ME baseline (Joglekar et al. KDD'20): a controller picks dims per frequency block."""

    dim_blocks: int = 4  # S: K splits into S dim blocks of K/S columns (K/S a multiple of 4)
    warmup_steps: int = 200  # supernet steps with every block on before the first episode
    steps_per_episode: int = 1  # supernet steps per sampled architecture (ENAS: 1)
    controller_lr: float = 0.05  # Adam on the controller's logits
    baseline_decay: float = 0.95  # exponential moving average of rewards (REINFORCE baseline)
    cost_weight: float = 1.0  # λ in reward = -val_logloss - λ·max(0, bytes/budget - 1)
    target_cr: float = 10.0  # budget = unpruned embedding bytes / target_cr


@dataclass(frozen=True)
class TrainConfig:
    """Optimisers, schedule, evaluation, early stopping and checkpoints."""

    epochs: int = 1
    max_steps: Optional[int] = None  # per epoch cap; None = the whole split
    dense_lr: float = 1e-3  # Adam, as the paper
    sparse_optimizer: str = "rowwise_adagrad"  # FBGEMM fused; adam exists on GPU only
    sparse_lr: float = 0.01
    eval_every: int = 1000  # steps between validation passes (early stopping)
    eval_max_batches: Optional[int] = None  # cap the validation pass; None = whole split
    patience: int = 3  # validation passes without improvement before stopping
    checkpoint_every: int = 1000
    log_every: int = 50
    pipeline: bool = True  # TrainPipelineSparseDist; False = plain loop


@dataclass(frozen=True)
class RunConfig:
    """Run directory and seeds."""

    dir: str = "runs/default"
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """The whole experiment; every section has defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    blocking: BlockingConfig = field(default_factory=BlockingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    nis: NISConfig = field(default_factory=NISConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(paths: list[str | Path], overrides: list[str] = ()) -> Config:
    """Merge YAML files (later wins) and ``section.key=value`` overrides into a Config."""
    raw: dict[str, dict[str, tuple[Any, str]]] = {}
    for path in paths:
        _merge(raw, _read_layers(Path(path)))
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        raw.setdefault(section, {})[name] = (yaml.safe_load(value), f"override {item!r}")
    return _build(Config, raw)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (lists for tuples), ready for YAML/JSON."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def config_from_dict(doc: dict[str, Any], source: str) -> Config:
    """The Config of ``config_to_dict``'s output; ``source`` names it in errors (an
    unknown key fails like a YAML file's)."""
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ConfigError(f"{source}: config must be a mapping of sections")
    return _build(Config, {section: {k: (v, source) for k, v in values.items()} for section, values in doc.items()})


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, loadable by ``load_config``."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, dict[str, tuple[Any, str]]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    layers: dict[str, dict[str, tuple[Any, str]]] = {}
    parent = doc.pop("extends", None)
    if parent is not None:
        layers = _read_layers(path.parent / parent, seen + (path,))
    for section, values in doc.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for name, value in values.items():
            layers.setdefault(section, {})[name] = (value, str(path))
    return layers


def _merge(into: dict, layer: dict) -> None:
    for section, values in layer.items():
        into.setdefault(section, {}).update(values)


def _build(cls: type, raw: dict[str, dict[str, tuple[Any, str]]]) -> Config:
    sections = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for section, values in raw.items():
        if section not in sections:
            source = next(iter(values.values()))[1] if values else "?"
            raise ConfigError(f"{source}: unknown section {section!r} (known: {sorted(sections)})")
        section_cls = typing.get_type_hints(cls)[section]
        hints = typing.get_type_hints(section_cls)
        known = {f.name for f in dataclasses.fields(section_cls)}
        fields_ = {}
        for name, (value, source) in values.items():
            if name not in known:
                raise ConfigError(f"{source}: unknown key {section}.{name} (known: {sorted(known)})")
            fields_[name] = _coerce(value, hints[name], f"{source}: {section}.{name}")
        kwargs[section] = section_cls(**fields_)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(hint)
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
