"""Layered YAML configs: extends, overrides, and errors that name the key and the file."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config, save_config


def write(path, text):
    path.write_text(text)
    return path


def test_child_overrides_parent_and_cli_overrides_both(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  name: fm\n  mlp_dims: [8, 4]\ntrain:\n  epochs: 3\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nmodel:\n  name: deepfm\n")
    cfg = load_config([child], ["train.epochs=5", "search.alpha_lr=0.1"])
    assert cfg.model.name == "deepfm" and cfg.model.mlp_dims == (8, 4)
    assert cfg.train.epochs == 5 and cfg.search.alpha_lr == 0.1


def test_unknown_key_names_key_and_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  nmae: fm\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.nmae"):
        load_config([bad])


def test_unknown_section_and_wrong_type_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        load_config([write(tmp_path / "a.yaml", "modle:\n  name: fm\n")])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int"):
        load_config([write(tmp_path / "b.yaml", "train:\n  epochs: three\n")])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config([], ["epochs=3"])
    with pytest.raises(ConfigError, match=r"search\.alpha_grad_dtype 'float16': expected one of"):
        load_config([], ["search.alpha_grad_dtype=float16"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config([], ["model.mlp_dims=[16]", "train.max_steps=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config([tmp_path / "resolved.yaml"]) == cfg


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config([path])
