"""What a registered version carries so it runs anywhere: signature, input example, code, pins.

MLflow loads a model in a process that may have no mtrank checkout and no mtrank install (a
serving image, `mlflow models serve`, a notebook). The version therefore bundles the code its
pyfunc imports (`code/mtrank/...`, put on `sys.path` by MLflow at load), pins every distribution
that code imports to the version it was trained with, and describes its inputs and outputs.

Signature types: MLflow cannot carry a null in an integer, boolean or array column (a JSON null
fails its conversion), and nulls are legal for every feature (null ids map to row 0, numerics
take their fill). Those columns are declared `any` and the pyfunc casts them back to the training
types it keeps beside the weights (`features.inputs`); string and float columns keep their type.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import shutil
from pathlib import Path

import pyarrow as pa

from mtrank.features.outputs import OutputSchema
from mtrank.features.spec import FeatureSpec

ROOMS = ("features", "models", "pipeline", "jobs")
# The distributions the bundled code imports when the pyfunc loads and predicts (pandas and
# mlflow itself included), pinned to the versions installed where the model was trained.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "polars", "polars-hash", "xxhash",
                "pydantic", "pyyaml", "tqdm")


def requirements() -> list[str]:
    pins = []
    for dist in REQUIREMENTS:
        version = md.version(dist).split("+")[0]   # torch's "+cpu" local tag is not on an index
        pins.append(f"{dist}=={version}")
    return pins


def stage_code(dst: Path) -> Path:
    """A copy of the `mtrank` package's sources (no tests, no caches) under `dst/mtrank`; MLflow
    copies it into the model as `code/mtrank`."""
    root = dst / "mtrank"
    for room in ROOMS:
        src = Path(importlib.import_module(f"mtrank.{room}").__file__).parent
        shutil.copytree(src, root / room, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "schedule"))
    return root


def _col_type(t: pa.DataType):
    from mlflow.types.schema import AnyType, DataType

    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return DataType.string
    if pa.types.is_floating(t):
        return DataType.double
    return AnyType()   # integers, booleans, lists, times: see the module docstring


def signature(spec: FeatureSpec, inputs: pa.Schema, trained: pa.Schema | None = None):
    """Inputs: every feature column of the spec (required: the column; nulls: allowed), and the
    columns serving sets (`serve_value`: optional; a client that still sends its logged slot is
    accepted without MLflow's per-request "extra inputs" warning, and overridden). Outputs: every
    output of the spec's task records, by its schema name."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    outputs: OutputSchema = spec.outputs
    served = [ColSpec(_col_type(trained.field(name).type) if trained is not None and name in trained.names
                      else AnyType(), name, required=False) for name in spec.served_values]
    return ModelSignature(
        inputs=Schema([ColSpec(_col_type(f.type), f.name) for f in inputs] + served),
        outputs=Schema([ColSpec(DataType.float, name) for name in outputs.names]))


def example_frame(example: pa.Table):
    """The input example as the DataFrame a client would send (nulls as None/NaN)."""
    return example.to_pandas(types_mapper=None, integer_object_nulls=True)
