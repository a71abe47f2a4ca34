"""Featurized arrays -> the model's `Batch`: columnar, one tensor per table, never one per field or row."""
from __future__ import annotations

import warnings

import torch

from mtrank.features.featurize import FeatureArrays
from mtrank.models.batch import Batch, TableInput

__all__ = ["Batch", "TableInput", "batch_from_arrays"]


def batch_from_arrays(a: FeatureArrays) -> Batch:
    """Zero-copy: the tensors share memory with the (read-only) numpy arrays polars hands out.

    Batches are inputs and never written in place, so torch's non-writable warning is moot.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy
        bags = {name: TableInput(t(x.values), t(x.offsets), None if x.weights is None else t(x.weights))
                for name, x in a.bags.items()}
        return Batch(a.rows, t(a.ids), bags, t(a.dense), {k: t(v) for k, v in a.labels.items()},
                     {k: t(v) for k, v in a.masks.items()}, None if a.group is None else t(a.group),
                     {k: t(v) for k, v in a.truth.items()})
