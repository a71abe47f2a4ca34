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


def fit_platt(z: np.ndarray, y: np.ndarray, l2: float = 1e-6, iterations: int = 100) -> tuple[float, float]:
    """(a, b) minimising the mean log loss of sigmoid(a z + b) against y (Newton's method with a
    step-halving line search, float64; a tiny ridge keeps one-class or separable data finite)."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    if z.size == 0 or y.min() == y.max():
        return 1.0, 0.0
    x = np.stack([z, np.ones_like(z)], 1)
    w = np.array([1.0, 0.0])

    def loss(w: np.ndarray) -> float:
        s = x @ w
        return float(np.mean(np.logaddexp(0, s) - y * s) + l2 * w @ w)

    current = loss(w)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / z.size + 2 * l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / z.size + 2 * l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6 and loss(w - t * step) > current:
            t /= 2
        if t <= 1e-6:
            break
        w, previous, current = w - t * step, current, loss(w - t * step)
        if previous - current < 1e-12:
            break
    return float(w[0]), float(w[1])


def fit_calibration(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                    spec: FeatureSpec, min_positives: int = 20) -> dict[str, dict]:
    """Platt parameters per binary task from uncalibrated predictions on held-out rows, each on its
    task's population (a task with a `space` on that space's positives). A task with fewer than
    `min_positives` positives there stays uncalibrated, and says so."""
    out: dict[str, dict] = {}
    for t in spec.tasks:
        if t.type != "binary":
            continue
        pop = masks[t.name].astype(bool)
        y = labels[t.name][pop]
        p = outputs[spec.outputs.own(t.name).name][pop]
        positives = int(y.sum())
        if positives < min_positives or positives == y.size:
            out[t.name] = {"scale": 1.0, "shift": 0.0, "rows": int(y.size), "positives": positives,
                           "fitted": False}
            continue
        a, b = fit_platt(logit(p), y)
        out[t.name] = {"scale": a, "shift": b, "rows": int(y.size), "positives": positives, "fitted": True}
    return out
