"""The tensors a model step consumes: columnar, one tensor per table, never one per field or row."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from features.featurize import FeatureArrays


@dataclass
class TableInput:
    """Pooled bags of one table's multi-hot fields, EmbeddingBag layout (bag = row * k + slot)."""

    values: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None


@dataclass
class Batch:
    size: int
    ids: torch.Tensor                   # int64 [B, n_id_fields]: spec.id_fields, one fused lookup
    bags: dict[str, TableInput]         # table -> its multi-hot fields
    dense: torch.Tensor                 # float32 [B, n_dense]
    labels: dict[str, torch.Tensor]     # task -> float32 [B]
    masks: dict[str, torch.Tensor]      # task -> bool [B]
    group: torch.Tensor | None          # int64 [B], evaluation reads only
    truth: dict[str, torch.Tensor]      # task -> float32 [B]

    def to(self, device: torch.device) -> "Batch":
        """The same batch on `device` (itself when that is the CPU, so the CPU path copies nothing)."""
        if device.type == "cpu":
            return self
        m = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        bags = {k: TableInput(m(b.values), m(b.offsets), m(b.weights)) for k, b in self.bags.items()}
        return Batch(self.size, m(self.ids), bags, m(self.dense), {k: m(v) for k, v in self.labels.items()},
                     {k: m(v) for k, v in self.masks.items()}, m(self.group),
                     {k: m(v) for k, v in self.truth.items()})

    @staticmethod
    def from_arrays(a: FeatureArrays) -> "Batch":
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
