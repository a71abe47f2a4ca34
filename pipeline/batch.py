"""The tensors a model step consumes: columnar, one tensor per table, never one per field or row."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from features.featurize import FeatureArrays


@dataclass
class TableInput:
    """Ids of every field of one table, EmbeddingBag layout (bag = row * k + slot).

    offsets None means each bag holds exactly one id (values reshape to [rows, k]).
    """

    values: torch.Tensor
    offsets: torch.Tensor | None
    weights: torch.Tensor | None


@dataclass
class Batch:
    size: int
    tables: dict[str, TableInput]
    dense: torch.Tensor                 # float32 [B, n_dense]
    labels: dict[str, torch.Tensor]     # task -> float32 [B]
    masks: dict[str, torch.Tensor]      # task -> bool [B]
    group: torch.Tensor | None          # int64 [B], evaluation reads only
    truth: dict[str, torch.Tensor]      # task -> float32 [B]

    @staticmethod
    def from_arrays(a: FeatureArrays) -> "Batch":
        """Zero-copy: the tensors share memory with the (read-only) numpy arrays polars hands out.

        Batches are inputs and never written in place, so torch's non-writable warning is moot.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return Batch._from_arrays(a)

    @staticmethod
    def _from_arrays(a: FeatureArrays) -> "Batch":
        t = torch.from_numpy
        tables = {name: TableInput(t(x.values), None if x.offsets is None else t(x.offsets),
                                   None if x.weights is None else t(x.weights)) for name, x in a.tables.items()}
        return Batch(a.rows, tables, t(a.dense), {k: t(v) for k, v in a.labels.items()},
                     {k: t(v) for k, v in a.masks.items()}, None if a.group is None else t(a.group), {k: t(v) for k, v in a.truth.items()})
