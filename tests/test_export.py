"""The shipped artifact (``dnis export``): weights in safetensors, the rest in JSON.
It predicts exactly as the run's checkpoint, loads where nothing may be unpickled and
without the dataset, refuses pickled, truncated, changed or missing files by name, and
an export that fails mid-write never leaves a complete-looking directory. Its
``torch.export`` program (``--exported``) equals the eager model at any batch size."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from launch import cli
from launch.export import PROGRAM_BITS, ExportError, export_run, load_run
from pipeline.data import synth
from pipeline.data.metadata import DatasetMeta
from pipeline.data.vocab import Vocabulary
from pipeline.inference import ArtifactError, load_model, load_program, read_tsv, serve_artifact
from pipeline.inference.artifact import MANIFEST_FILE, MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE, sha256_of
from pipeline.inference.exported import EXAMPLE_ROWS, PROGRAM_FILE

pytestmark = pytest.mark.multirank  # the fixtures spawn 2-rank runs


def fresh_block(tmp_path_factory, rows: int, seed: int):
    """``rows`` fresh raw rows from the generator that made the dataset, as one parsed block."""
    path = tmp_path_factory.mktemp("raw") / "rows.tsv"
    synth.main(["--rows", str(rows), "--seed", str(seed), "--out", str(path)])
    (_, block), = read_tsv(path)
    return block


@pytest.fixture(scope="module")
def raw_block(tmp_path_factory):
    return fresh_block(tmp_path_factory, 200, seed=5)


@pytest.fixture(scope="module")
def artifact(retrain_run, tmp_path_factory) -> Path:
    """The retrain run exported by ``dnis export`` to a directory of its own."""
    out = tmp_path_factory.mktemp("export") / "model"
    cli.main(["export", "--run-dir", str(retrain_run), "--out", str(out)])
    return out


def test_export_of_a_retrain_run_predicts_exactly_as_its_checkpoint(retrain_run, artifact, raw_block):
    from_checkpoint = serve_artifact(load_run(retrain_run)).predict(raw_block)
    assert torch.equal(load_model(artifact).predict(raw_block), from_checkpoint)
    # The retrain stage exported its best model into the run: the run directory loads through it.
    assert (retrain_run / "model" / MANIFEST_FILE).is_file()
    assert torch.equal(load_model(retrain_run).predict(raw_block), from_checkpoint)
    int8 = serve_artifact(load_run(retrain_run), bits=8).predict(raw_block)
    assert torch.equal(load_model(artifact, bits=8).predict(raw_block), int8)
    assert not torch.equal(int8, from_checkpoint)  # int8 did quantize

    model = json.loads((artifact / MODEL_FILE).read_text())
    assert model["projection"] and model["plan"] and model["source"]["stage"] == "retrain"
    assert sorted(p.name for p in artifact.iterdir()) == sorted([MANIFEST_FILE, MODEL_FILE, VOCAB_FILE, WEIGHTS_FILE])
    run_bytes = sum(p.stat().st_size for p in retrain_run.rglob("*") if p.is_file())
    print("artifact bytes", {p.name: p.stat().st_size for p in artifact.iterdir()}, "run dir bytes", run_bytes)


def test_the_artifact_loads_where_nothing_may_be_unpickled_nor_the_dataset_read(
    retrain_run, artifact, raw_block, monkeypatch,
):
    expected = load_model(artifact).predict(raw_block)

    unpickled = []

    def unpickle(*args, **kwargs):
        unpickled.append(args)
        raise AssertionError("unpickling")

    class Unpickler:
        def __init__(self, *args, **kwargs):
            unpickle()

    def read_dataset(*args, **kwargs):
        raise AssertionError("reading the dataset")

    for module, name, replacement in (
        (pickle, "load", unpickle), (pickle, "loads", unpickle), (pickle, "Unpickler", Unpickler),  # torch.load's
        (torch, "load", unpickle),
    ):
        monkeypatch.setattr(module, name, replacement)
    with monkeypatch.context() as without_dataset:
        without_dataset.setattr(DatasetMeta, "load", read_dataset)
        without_dataset.setattr(Vocabulary, "load", read_dataset)
        assert torch.equal(load_model(artifact).predict(raw_block), expected)
    assert not unpickled
    # The trainer's checkpoint is no such file: DCP reads its .metadata with pickle.
    with pytest.raises(AssertionError, match="unpickling"):
        load_run(retrain_run)
    assert unpickled


def resign(directory: Path, name: str) -> None:
    """Record ``name``'s current bytes and sha256 in the manifest (as a forger would)."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"][name] = {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_pickled_payload_or_other_tensors_in_place_of_the_weights_are_refused_by_name(artifact, tmp_path):
    copy = Path(shutil.copytree(artifact, tmp_path / "model"))
    weights = safetensors.torch.load((copy / WEIGHTS_FILE).read_bytes())  # not load_file: its tensors map the file
    torch.save(weights, copy / WEIGHTS_FILE)  # a pickle (zip) where safetensors belongs
    with pytest.raises(ArtifactError, match=rf"^{copy / WEIGHTS_FILE}: (sha256 differs|\d+ bytes)"):
        load_model(copy)
    resign(copy, WEIGHTS_FILE)  # with a matching manifest too: safetensors refuses it, nothing unpickles it
    with pytest.raises(ArtifactError, match=rf"^{copy / WEIGHTS_FILE}: not a readable safetensors file"):
        load_model(copy)

    # A valid safetensors file whose header declares other tensors than the model has.
    key = next(k for k in sorted(weights) if k.endswith(".weight"))
    safetensors.torch.save_file({**weights, key: weights[key].double()}, copy / WEIGHTS_FILE)
    resign(copy, WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match=rf"^{copy / WEIGHTS_FILE}: tensor '{key}' is torch.float64"):
        load_model(copy)
    safetensors.torch.save_file({k: v for k, v in weights.items() if k != key}, copy / WEIGHTS_FILE)
    resign(copy, WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match=rf"^{copy / WEIGHTS_FILE}: no tensor '{key}'"):
        load_model(copy)

    vocab = safetensors.numpy.load((copy / VOCAB_FILE).read_bytes())
    (copy / VOCAB_FILE).write_bytes(pickle.dumps(vocab))
    resign(copy, VOCAB_FILE)
    with pytest.raises(ArtifactError, match=rf"^{copy / VOCAB_FILE}: not a readable safetensors file"):
        load_model(copy)


def test_truncated_changed_or_missing_files_are_refused_by_name(retrain_run, artifact, raw_block, tmp_path, capsys):
    def broken(name: str) -> Path:
        return Path(shutil.copytree(artifact, tmp_path / name))

    copy = broken("truncated")
    data = (copy / WEIGHTS_FILE).read_bytes()
    (copy / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    says = rf"^{copy / WEIGHTS_FILE}: {len(data) // 2} bytes, manifest.json says {len(data)} \(truncated"
    with pytest.raises(ArtifactError, match=says):
        load_model(copy)
    resign(copy, WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match=rf"^{copy / WEIGHTS_FILE}: not a readable safetensors file"):
        load_model(copy)

    copy = broken("changed")
    text = (copy / MODEL_FILE).read_text()
    digit = next(i for i, c in enumerate(text) if c.isdigit())
    (copy / MODEL_FILE).write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])  # same size
    with pytest.raises(ArtifactError, match=rf"^{copy / MODEL_FILE}: sha256 differs from manifest.json"):
        load_model(copy)
    doc = json.loads(text)
    doc["config"]["model"]["dims"] = 8  # a key no config has, under a manifest that matches it
    (copy / MODEL_FILE).write_text(json.dumps(doc))
    resign(copy, MODEL_FILE)
    with pytest.raises(ArtifactError, match=rf"^{copy / MODEL_FILE}: unknown key model.dims"):
        load_model(copy)

    copy = broken("missing")
    (copy / VOCAB_FILE).unlink()
    with pytest.raises(ArtifactError, match=rf"^{copy / VOCAB_FILE}: missing"):
        load_model(copy)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match=rf"^{copy / MANIFEST_FILE}: missing; not a finished export"):
        load_model(copy)

    # dnis predict says the same in one line, and writes nothing.
    rows, out = tmp_path / "rows.tsv", tmp_path / "scores.txt"
    synth.main(["--rows", "10", "--seed", "1", "--out", str(rows)])
    with pytest.raises(SystemExit, match=rf"^dnis predict: {copy / MANIFEST_FILE}: missing; not a finished export"):
        cli.main(["predict", "--run-dir", str(copy), "--input", str(rows), "--out", str(out), "--no-progress"])
    assert not out.exists()

    unexported = Path(shutil.copytree(retrain_run, tmp_path / "unexported", ignore=shutil.ignore_patterns("model")))
    hint = rf"^{unexported}: no exported model in {unexported}/model; run `dnis export --run-dir {unexported}`$"
    with pytest.raises(ArtifactError, match=hint):
        load_model(unexported)


def test_an_export_that_fails_mid_write_never_looks_complete(retrain_run, artifact, raw_block, tmp_path, monkeypatch):
    out = Path(shutil.copytree(artifact, tmp_path / "model"))
    expected = load_model(out).predict(raw_block)
    manifest = (out / MANIFEST_FILE).read_text()
    save_file = safetensors.numpy.save_file

    def half_then_fail(arrays, path, *args, **kwargs):  # the vocabulary is written after the weights
        save_file(arrays, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_fail)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(OSError, match="disk full"):
            export_run(retrain_run, target)
        assert not (target.with_name(target.name + ".tmp") / MANIFEST_FILE).exists()
    assert not (tmp_path / "fresh").exists()
    # The earlier export is untouched and still loads.
    assert (out / MANIFEST_FILE).read_text() == manifest
    assert torch.equal(load_model(out).predict(raw_block), expected)

    monkeypatch.undo()
    export_run(retrain_run, tmp_path / "fresh")  # a later export replaces the stale temp directory
    assert torch.equal(load_model(tmp_path / "fresh").predict(raw_block), expected)
    assert not (tmp_path / "fresh.tmp").exists()


def test_a_train_run_ships_its_full_tables_and_a_search_run_is_refused(train_run, search_run, raw_block, tmp_path):
    model = load_model(train_run)  # the train stage exported into <run>/model
    assert model.rewrite is None and json.loads((train_run / "model" / MODEL_FILE).read_text())["plan"] is None
    assert list(model.layout.num_embeddings) == list(model.layout.keys)  # tables in key order, as trained
    assert torch.equal(model.predict(raw_block), serve_artifact(load_run(train_run)).predict(raw_block))
    with pytest.raises(SystemExit, match=rf"^dnis export: {search_run}: a search run"):
        cli.main(["export", "--run-dir", str(search_run), "--out", str(tmp_path / "search-model")])
    with pytest.raises(ExportError, match="not a complete checkpoint"):
        export_run(train_run, tmp_path / "none", checkpoint="step_missing")
    assert not (tmp_path / "search-model").exists() and not (tmp_path / "none").exists()
    assert np.isfinite(model.predict(raw_block).numpy()).all()


@pytest.fixture(scope="module")
def block_4096(tmp_path_factory):
    return fresh_block(tmp_path_factory, 4096, seed=7)


@pytest.mark.parametrize("run, precision", [
    ("retrain_run", "fp32"), ("retrain_run", "int8"), ("retrain_run", "int4"), ("train_run", "fp32"),
])
def test_the_exported_program_equals_eager_at_batch_1_and_4096(run, precision, request, block_4096, tmp_path):
    out = tmp_path / "model"
    cli.main(["export", "--run-dir", str(request.getfixturevalue(run)), "--out", str(out), "--exported", precision])
    program, eager = load_program(out).module(), load_model(out, bits=PROGRAM_BITS[precision])
    dense, ids = eager.encode(block_4096)
    with torch.no_grad():
        for rows in (1, 4096, 300):
            assert rows != EXAMPLE_ROWS  # not the batch size it was traced with
            assert torch.equal(program(dense[:rows], ids[:rows]), eager(dense[:rows], ids[:rows])), rows
    assert PROGRAM_FILE in json.loads((out / MANIFEST_FILE).read_text())["files"]
    with open(out / PROGRAM_FILE, "ab") as f:
        f.write(b"0")
    with pytest.raises(ArtifactError, match=rf"^{out / PROGRAM_FILE}: \d+ bytes, manifest.json says"):
        load_program(out)
