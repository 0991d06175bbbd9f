"""Serving: ``load_model(run_dir)`` scores raw Criteo rows in one process (see ``model``)."""

from pipeline.inference.model import ServingModel, load_model, quantize_tables, serving_model
from pipeline.inference.raw import RawInputError, read_parquet, read_raw, read_tsv

__all__ = ["RawInputError", "ServingModel", "load_model", "quantize_tables", "serving_model", "read_parquet", "read_raw", "read_tsv"]
