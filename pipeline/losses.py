"""Multi-task loss built from the task records: one term per task, no model-type branches.

Each task record becomes a `LossTerm` that says which model output to read, which population to
average over and which target to compare against. ESMM is not a special case here: with
`esmm: true` a task with a parent is trained on its *entire-space product* (log p_parent +
log p_task against parent ∧ task over the parent's population); without it, on its own logit
over its own population (its space task's positives). Such terms average over their own population,
so a batch with 3 positives of the space task weighs the term as 3 rows' mean, not 4096 rows'.

`esmm` may also be an `EsmmConfig` (ESMM that keeps its towers): the entire-space term plus, on the
same task's term, `tower_weight` x a loss on the child's own logit from the rows where its label is
observed — `clicked`: BCE averaged over its space; `ips`: the ESCM² counterfactual regulariser, BCE
on its space's rows weighted by 1 / p_parent (detached, floored) and averaged over the parent's
population. The extra term is folded into the task's loss, so per-task keys, validation losses and
early stopping see one figure per task: the task's whole training objective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.features.spec import FeatureSpec
from mtrank.features.outputs import joint_positive
from mtrank.models.batch import Batch, ModelOutput
from mtrank.models.config import EsmmConfig

LOG_HALF = -math.log(2.0)


@dataclass(frozen=True)
class LossTerm:
    """How one task is trained: the model output, the population, the target and the loss."""

    task: str                        # the task record; logits and log-products are keyed by it
    kind: Literal["logit_bce", "logprob_bce", "mse", "mse_log1p"]
    population: str                  # task whose mask selects the rows (its own or its parent's)
    targets: tuple[str, ...]         # labels that must all be positive (binary) / the label (regression)
    weight: float
    binary: bool
    # ESMM that keeps its towers: + tower_weight x a loss on the task's own logit over its space
    # (`clicked`), or over its space's rows weighted by 1 / max(p_parent, ips_floor) (`ips`)
    tower: Literal["none", "clicked", "ips"] = "none"
    tower_weight: float = 0.0
    ips_floor: float = 0.0


def loss_terms(spec: FeatureSpec, esmm: bool | EsmmConfig) -> tuple[LossTerm, ...]:
    tower = esmm if isinstance(esmm, EsmmConfig) else EsmmConfig(tower_loss="none")
    terms = []
    for t in spec.tasks:
        if t.type == "regression":
            terms.append(LossTerm(t.name, t.loss, t.name, (t.name,), t.weight, False))
        elif esmm is not False and t.parent is not None:
            extra = {}
            if tower.tower_loss != "none":
                extra = {"tower": tower.tower_loss, "tower_weight": tower.tower_weight,
                         "ips_floor": tower.ips_floor if tower.tower_loss == "ips" else 0.0}
            terms.append(LossTerm(t.name, "logprob_bce", t.parent, spec.outputs.product(t.name).targets,
                                  t.weight, True, **extra))
        else:
            terms.append(LossTerm(t.name, "logit_bce", t.name, (t.name,), t.weight, True))
    return tuple(terms)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012's two-branch rule)."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bce_from_log_prob(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row binary cross-entropy from log p: stays finite where p·p would round to 0 or 1."""
    return -(y * log_p + (1.0 - y) * log1mexp(log_p))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean over the rows of the population; 0 (with a graph) when the batch has none of them."""
    n = int(mask.sum())
    if n == 0:
        return values.sum() * 0.0, 0
    return values[mask].mean(), n


def tower_loss(t: LossTerm, out: ModelOutput, batch: Batch) -> torch.Tensor:
    """The child's own-logit term of ESMM that keeps its towers (unweighted).

    `clicked`: BCE of the task's logit averaged over its space (the parent's positives).
    `ips`: sum over the space's rows of BCE / max(p_parent, ips_floor), divided by the rows of the
    parent's population: an inverse-propensity estimate of the task's BCE over the whole parent
    population (ESCM², Wang et al. 2022). p_parent is detached: the term trains the child only.
    """
    observed = batch.masks[t.task]
    z = out.tower_logits[t.task] if out.tower_logits else out.logits[t.task]   # tower_scope: tower -> detached features
    rows = F.binary_cross_entropy_with_logits(z.float(), batch.labels[t.task], reduction="none")
    if t.tower == "clicked":
        return masked_mean(rows, observed)[0]
    propensity = torch.sigmoid(out.logits[t.population].float()).detach().clamp(min=t.ips_floor)
    return masked_mean(torch.where(observed, rows / propensity, torch.zeros_like(rows)),
                       batch.masks[t.population])[0]


class UncertaintyWeights(nn.Module):
    """Kendall, Gal & Cipolla (CVPR 2018): learn s_t = log σ_t² per task.

    Regression terms get ½·e^{-s}·L + ½·s, classification terms e^{-s}·L + ½·s; the ½·s term
    stops σ growing without bound. Fixed task weights still multiply each term.
    """

    def __init__(self, terms: tuple[LossTerm, ...]):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(len(terms)))
        self.register_buffer("scale", torch.tensor([1.0 if t.binary else 0.5 for t in terms]),
                             persistent=False)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars


class MultiTaskLoss(nn.Module):
    """out, batch -> (total loss, {task: detached loss}, {task: rows in population})."""

    def __init__(self, spec: FeatureSpec, esmm: bool | EsmmConfig, weighting: Literal["fixed", "uncertainty"] = "fixed"):
        super().__init__()
        self.terms = loss_terms(spec, esmm)
        self.register_buffer("weights", torch.tensor([t.weight for t in self.terms]), persistent=False)
        self.uncertainty = UncertaintyWeights(self.terms) if weighting == "uncertainty" else None

    def per_task(self, out: ModelOutput, batch: Batch) -> tuple[list[torch.Tensor], list[int]]:
        losses, counts = [], []
        for t in self.terms:
            mask = batch.masks[t.population]
            if t.kind == "logit_bce":
                rows = F.binary_cross_entropy_with_logits(out.logits[t.task].float(),
                                                          batch.labels[t.task], reduction="none")
            elif t.kind == "logprob_bce":
                y = joint_positive(batch.labels, t.targets)
                rows = bce_from_log_prob(out.log_products[t.task].float(), y.float())
                if t.tower != "none":
                    loss, n = masked_mean(rows, mask)
                    losses.append(loss + t.tower_weight * tower_loss(t, out, batch))
                    counts.append(n)
                    continue
            else:
                target = batch.labels[t.task]
                if t.kind == "mse_log1p":
                    target = torch.log1p(target)
                rows = (out.logits[t.task].float() - target).square()
            loss, n = masked_mean(rows, mask)
            losses.append(loss)
            counts.append(n)
        return losses, counts

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float], dict[str, int]]:
        losses, counts = self.per_task(out, batch)
        stacked = torch.stack(losses)
        weighted = self.weights * (stacked if self.uncertainty is None else self.uncertainty(stacked))
        detached = stacked.detach().tolist()
        return weighted.sum(), {t.task: v for t, v in zip(self.terms, detached)}, \
            {t.task: n for t, n in zip(self.terms, counts)}
