"""Exact offline metrics over whole evaluation sets (numpy, vectorised, ties handled)."""
from __future__ import annotations

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; tied scores share their average rank.

    One sort over the whole set, so the figure is exact and not an average of per-batch AUCs.
    NaN when the set has only one class.
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) > 0
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    new = np.empty(s.size, bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    starts = np.flatnonzero(new)                       # first sorted index of each tie group
    sizes = np.diff(np.append(starts, s.size))
    avg_rank = starts + (sizes + 1) / 2.0              # 1-based average rank of each group
    ranks = np.repeat(avg_rank, sizes)
    rank_sum = ranks[y[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(p: np.ndarray, y: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    y = np.asarray(y) > 0
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - target) ** 2)))


def r2(pred: np.ndarray, target: np.ndarray) -> float:
    target = np.asarray(target, np.float64)
    ss_tot = np.sum((target - target.mean()) ** 2)
    return float(1.0 - np.sum((np.asarray(pred, np.float64) - target) ** 2) / ss_tot) if ss_tot else float("nan")
