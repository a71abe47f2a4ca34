"""Post-hoc Platt calibration per binary task, fitted on held-out rows.

The fused score multiplies probabilities, so a task whose mean prediction is off by 10 % shifts
every candidate's score by that factor against the other tasks'. Platt scaling on the logit,
p = sigmoid(a * z + b), is monotone per task (AUC unchanged), has two parameters (no overfitting
on a day of validation rows, unlike isotonic bins on rare tasks) and lives in the model as a
buffer, so evaluation, scoring and the registered pyfunc all apply it.
"""
from __future__ import annotations

import numpy as np

from mtrank.features.spec import FeatureSpec

EPS = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(z: np.ndarray, y: np.ndarray, prior_sd: float | None = None, prior_shift: float = 0.0,
              iterations: int = 100) -> tuple[float, float]:
    """(a, b) maximising the log likelihood of sigmoid(a z + b) against y plus a Gaussian prior centred on
    the identity (a = 1, b = prior_shift) with standard deviation `prior_sd` on both.

    The prior is what keeps a fit on a few hundred positives from moving a task by its own sampling
    noise (±1/sqrt(positives) in PCOC): its weight is fixed while the data's grows with the rows, so
    a large validation set overrides it and a small one barely moves the model. `prior_sd` None is
    the plain maximum-likelihood fit (a vanishing ridge keeps one-class or separable data finite).
    Newton's method with a step-halving line search, float64.
    """
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    centre = np.array([1.0, float(prior_shift)])
    if z.size == 0 or y.min() == y.max():
        return float(centre[0]), float(centre[1])
    x = np.stack([z, np.ones_like(z)], 1)
    precision = 1.0 / prior_sd ** 2 if prior_sd else 2e-6 * z.size

    def loss(w: np.ndarray) -> float:
        s = x @ w
        d = w - centre
        return float(np.sum(np.logaddexp(0, s) - y * s) + 0.5 * precision * d @ d)

    w = centre.copy()
    current = loss(w)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + precision * (w - centre)
        hess = (x * (p * (1 - p))[:, None]).T @ x + precision * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6 and loss(w - t * step) > current:
            t /= 2
        if t <= 1e-6:
            break
        w, previous, current = w - t * step, current, loss(w - t * step)
        if previous - current < 1e-10 * max(1.0, abs(current)):
            break
    return float(w[0]), float(w[1])


def fit_calibration(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                    spec: FeatureSpec, prior_sd: float | None = None, prior_shifts: dict[str, float] | None = None,
                    min_positives: int = 20) -> dict[str, dict]:
    """Platt parameters per binary task from uncalibrated predictions on held-out rows, each on its
    task's population (a task with a `space` on that space's positives). `prior_shifts` moves a
    task's prior centre (negative sampling's known log keep-rate). A task with fewer than
    `min_positives` positives (or no negatives) there keeps its prior centre, and says so."""
    shifts = prior_shifts or {}
    out: dict[str, dict] = {}
    for t in spec.tasks:
        if t.type != "binary":
            continue
        pop = masks[t.name].astype(bool)
        y = labels[t.name][pop]
        p = outputs[spec.outputs.own(t.name).name][pop]
        positives, centre = int(y.sum()), float(shifts.get(t.name, 0.0))
        record = {"rows": int(y.size), "positives": positives, "prior_sd": prior_sd, "prior_shift": centre}
        if positives < min_positives or positives == y.size:
            out[t.name] = {"scale": 1.0, "shift": centre, **record, "fitted": False}
            continue
        a, b = fit_platt(logit(p), y, prior_sd, centre)
        out[t.name] = {"scale": a, "shift": b, **record, "fitted": True}
    return out
