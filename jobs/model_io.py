"""A trained model on disk: weights as a plain state dict beside the spec, statistics and config.

Everything needed to score raw rows travels together (the FeatureSpec carries the hash seed), and
loading never unpickles code: weights go through `torch.load(weights_only=True)`, the rest is YAML
(safe-loaded) and JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtrank.features.numeric import NumericStats
from mtrank.features.spec import FeatureSpec, SpecError, load_spec
from mtrank.models import ModelConfig, MultiTaskRanker
from mtrank.pipeline.checkpoint import load_tensors
from mtrank.pipeline.output_files import write_atomic

FILES = ("weights.pt", "feature_spec.yaml", "numeric_stats.json", "model_config.json")


OPTIMIZER = "optimizer.pt"  # optional: optimizer and loss-weight state, for warm starts
INPUT_SCHEMA = "input_schema.arrow"      # the feature columns' types in the training logs (serving casts to them)
INPUT_EXAMPLE = "input_example.parquet"  # a few training rows and one all-null row, for the model signature
TRAINING = "training.json"   # how the outputs were made: negative sampling, calibration (the buffer's provenance)


@dataclass
class SavedModel:
    spec: FeatureSpec
    stats: NumericStats
    config: ModelConfig
    model: MultiTaskRanker
    optimizer: dict | None = None
    input_schema: pa.Schema | None = None   # None for models saved before it was kept
    training: dict | None = None            # training.json: negative sampling and calibration


def _write_parquet(table: pa.Table):
    def write(f):
        pq.write_table(table, f)
    return write


def save_model(path: str | Path, model: MultiTaskRanker, spec: FeatureSpec, stats: NumericStats,
               optimizer: dict | None = None, input_schema: pa.Schema | None = None,
               input_example: pa.Table | None = None, training: dict | None = None) -> Path:
    """`input_schema`: the training logs' schema (only the spec's feature columns are kept);
    `input_example`: raw rows with those columns."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "weights.pt", lambda f: torch.save({k: v.cpu() for k, v in model.state_dict().items()}, f))
    if optimizer is not None:
        write_atomic(path / OPTIMIZER, lambda f: torch.save(optimizer, f))
    write_atomic(path / "feature_spec.yaml", spec.to_yaml().encode())
    write_atomic(path / "numeric_stats.json", stats.to_json().encode())
    write_atomic(path / "model_config.json", model.cfg.model_dump_json(indent=1).encode())
    if input_schema is not None:
        from mtrank.features.inputs import serving_schema

        write_atomic(path / INPUT_SCHEMA, serving_schema(spec, input_schema).serialize().to_pybytes())
    if input_example is not None:
        write_atomic(path / INPUT_EXAMPLE, _write_parquet(input_example))
    if training is not None:
        write_atomic(path / TRAINING, json.dumps(training, indent=1).encode())
    return path


def read_input_schema(path: str | Path) -> pa.Schema | None:
    f = Path(path) / INPUT_SCHEMA
    return pa.ipc.read_schema(pa.py_buffer(f.read_bytes())) if f.exists() else None


def read_input_example(path: str | Path) -> pa.Table | None:
    f = Path(path) / INPUT_EXAMPLE
    return pq.read_table(f) if f.exists() else None


def read_spec(path: str | Path) -> FeatureSpec:
    """The FeatureSpec a saved model was trained with (hash seed included)."""
    return load_spec(Path(path) / "feature_spec.yaml")


def load_model(path: str | Path, with_optimizer: bool = False) -> SavedModel:
    path = Path(path)
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise SpecError(f"{path}: not a saved mtrank model (missing {', '.join(missing)})")
    spec = read_spec(path)
    stats = NumericStats.from_json((path / "numeric_stats.json").read_text())
    config = ModelConfig.model_validate(json.loads((path / "model_config.json").read_text()))
    model = MultiTaskRanker(spec, config, initialise=False)   # every table is overwritten next (strict)
    state = load_tensors(path / "weights.pt")
    model.load_state_dict(state)
    model.eval()
    optimizer = None
    if with_optimizer and (path / OPTIMIZER).exists():
        optimizer = load_tensors(path / OPTIMIZER)
    training = json.loads((path / TRAINING).read_text()) if (path / TRAINING).exists() else None
    return SavedModel(spec, stats, config, model, optimizer, read_input_schema(path), training)


def trained_keep_rate(saved: SavedModel) -> tuple[str, float] | None:
    """(task, keep rate) when mtrank trained the model on down-sampled negatives (and corrected for it)."""
    ns = (saved.training or {}).get("negative_sampling")
    return (ns["task"], float(ns["keep_rate"])) if ns else None
