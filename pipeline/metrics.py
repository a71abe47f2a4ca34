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


def expected_auc(scores: np.ndarray, prob: np.ndarray) -> float:
    """The AUC a score would get on average over label draws y_i ~ Bernoulli(prob_i), where the
    true probabilities are known (generated data).

    Pairs are weighted by P(i positive, j negative) = p_i (1 - p_j), i != j, instead of by one
    draw of labels, so the figure carries no label-sampling noise: two models scored on the same
    rows differ only by how they rank them. A ratio of expectations (exact as rows grow), in one sort.
    """
    s = np.asarray(scores, np.float64)
    p = np.asarray(prob, np.float64)
    q = 1.0 - p
    pairs = p.sum() * q.sum() - np.dot(p, q)           # expected positive-negative pairs, i != j
    if s.size < 2 or pairs <= 0:
        return float("nan")
    _, tie = np.unique(s, return_inverse=True)         # tie groups in ascending score order
    gp = np.bincount(tie, weights=p)
    gq = np.bincount(tie, weights=q)
    gpq = np.bincount(tie, weights=p * q)
    below = np.cumsum(gq) - gq                         # expected negatives scored strictly lower
    wins = np.dot(gp, below) + 0.5 * (gp * gq - gpq).sum()
    return float(wins / pairs)


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


def gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Group AUC: per-group AUC weighted by the group's impressions; groups with one class only
    are excluded (their AUC is undefined). Returns (GAUC, groups used). One lexsort, no loop.
    """
    scores = np.asarray(scores, np.float64)
    y = np.asarray(labels) > 0
    g = np.asarray(groups)
    if scores.size == 0:
        return float("nan"), 0
    order = np.lexsort((scores, g))                    # by group, then score
    s, yy, gg = scores[order], y[order], g[order]
    n = s.size
    new_group = np.empty(n, bool)
    new_group[0] = True
    np.not_equal(gg[1:], gg[:-1], out=new_group[1:])
    gid = np.cumsum(new_group) - 1                     # dense group index, sorted
    group_start = np.flatnonzero(new_group)
    new_tie = new_group.copy()
    new_tie[1:] |= s[1:] != s[:-1]
    tie_start = np.flatnonzero(new_tie)
    tie_size = np.diff(np.append(tie_start, n))
    pos_in_group = tie_start - group_start[gid[tie_start]]
    ranks = np.repeat(pos_in_group + (tie_size + 1) / 2.0, tie_size)   # 1-based, within group
    n_groups = group_start.size
    n_pos = np.bincount(gid, weights=yy, minlength=n_groups)
    size = np.bincount(gid, minlength=n_groups).astype(np.float64)
    n_neg = size - n_pos
    rank_pos = np.bincount(gid, weights=ranks * yy, minlength=n_groups)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan"), 0
    aucs = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(aucs * size[ok]) / np.sum(size[ok])), int(ok.sum())


def normalized_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """Logloss divided by the entropy of the observed base rate (He et al. 2014): < 1 beats the
    best constant predictor; independent of the base rate, unlike raw logloss."""
    rate = float(np.mean(np.asarray(y) > 0)) if np.size(y) else float("nan")
    if not 0.0 < rate < 1.0:
        return float("nan")
    base = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return logloss(p, y) / base


def calibration_bins(p: np.ndarray, y: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """Reliability curve on equal-count bins of the prediction: mean prediction vs observed rate.

    Equal-count bins keep every point backed by the same number of rows, which matters for
    rare-event tasks where fixed-width bins above 0.1 are nearly empty.
    """
    p = np.asarray(p, np.float64)
    y = (np.asarray(y) > 0).astype(np.float64)
    if p.size == 0:
        return {"mean_pred": [], "observed": [], "rows": []}
    order = np.argsort(p, kind="stable")
    edges = np.linspace(0, p.size, min(bins, p.size) + 1).astype(np.int64)
    idx = np.repeat(np.arange(edges.size - 1), np.diff(edges))
    rows = np.bincount(idx).astype(np.float64)
    return {"mean_pred": (np.bincount(idx, weights=p[order]) / rows).tolist(),
            "observed": (np.bincount(idx, weights=y[order]) / rows).tolist(),
            "rows": rows.astype(int).tolist()}


def roc_points(scores: np.ndarray, labels: np.ndarray, points: int = 200) -> dict[str, list[float]]:
    """ROC curve (FPR, TPR) at up to `points` thresholds, ties kept together; for plotting."""
    scores = np.asarray(scores, np.float64)
    y = np.asarray(labels) > 0
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        return {"fpr": [], "tpr": []}
    order = np.argsort(-scores, kind="stable")
    s, yy = scores[order], y[order]
    last_of_tie = np.append(s[1:] != s[:-1], True)
    tp = np.cumsum(yy)[last_of_tie]
    fp = np.cumsum(~yy)[last_of_tie]
    keep = np.unique(np.linspace(0, tp.size - 1, min(points, tp.size)).astype(np.int64))
    return {"fpr": [0.0] + (fp[keep] / n_neg).tolist(), "tpr": [0.0] + (tp[keep] / n_pos).tolist()}
