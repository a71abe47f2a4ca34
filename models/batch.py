"""The typed input and output of a model step: columnar tensors in, named outputs out.

They live at the lowest layer that uses them (the model), so `models` imports nothing from the data
pipeline; `pipeline.batch` builds a `Batch` from featurized arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


@dataclass
class ModelOutput:
    """A forward pass, keyed by the spec's `OutputSchema` names and task names.

    logits: task -> raw tower output [B] (a regression task's loss-space prediction);
    predictions: output name (schema) -> per-row value [B] (probabilities, products, regression values);
    log_products: child task -> log p(parent ∧ child) [B], finite for any logit (entire-space loss);
    gates: task -> gate weights [B, experts] (MoE bottoms) or None;
    tower_logits: child task -> its tower's logit as the child's own-logit term reads it (training with
        `esmm.tower_scope` tower or dense only): over the bottom's features detached (tower: the term
        trains the tower alone), or over the bottom run again on detached embeddings of the rows of
        the children's spaces, 0 elsewhere (dense: the term trains no embedding row).
    """

    logits: dict[str, torch.Tensor]
    predictions: dict[str, torch.Tensor]
    log_products: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor] | None
    tower_logits: dict[str, torch.Tensor] | None = None
