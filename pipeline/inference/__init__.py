"""Serving: ``load_model(path)`` scores raw Criteo rows in one process (see ``model``),
from an exported artifact (see ``artifact``); ``export_program`` exports its tensor part
with ``torch.export`` (see ``exported``)."""

from pipeline.inference.artifact import Artifact, ArtifactError, read_artifact, write_artifact
from pipeline.inference.exported import export_program, load_program
from pipeline.inference.model import ServingModel, load_model, inference_tables, serve_artifact, serving_model
from pipeline.inference.raw import RawInputError, read_parquet, read_raw, read_tsv

__all__ = [
    "Artifact", "ArtifactError", "RawInputError", "ServingModel", "export_program", "load_model", "load_program",
    "inference_tables", "serve_artifact", "serving_model", "read_artifact", "read_parquet", "read_raw", "read_tsv",
    "write_artifact",
]
