"""Exact offline metrics over whole evaluation sets (numpy, vectorised, ties handled)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

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


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` in its own order, tied values sharing their average rank (one sort)."""
    ranks = np.empty(x.size, np.float64)
    if x.size == 0:
        return ranks
    order = np.argsort(x, kind="stable")
    s = x[order]
    new = np.empty(s.size, bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, s.size))
    ranks[order] = np.repeat(starts + (sizes + 1) / 2.0, sizes)
    return ranks


def _structural_components(score: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placements, by Sun & Xu's midranks: V10_i = P(score of positive i beats a random
    negative), V01_j = P(a random positive beats negative j), ties counting one half."""
    x, y = score[pos], score[~pos]
    m, n = x.size, y.size
    tz = _midranks(np.concatenate([x, y]))
    v10 = (tz[:m] - _midranks(x)) / n                  # negatives below positive i (+ half the ties)
    v01 = 1.0 - (tz[m:] - _midranks(y)) / m            # positives above negative j (+ half the ties)
    return v10, v01


@dataclass(frozen=True)
class PairedAUC:
    """Two AUCs on the same rows and their difference, with DeLong's standard error.

    `lower`/`upper`: the two-sided `confidence` interval of delta; `bound`: the one-sided upper
    confidence bound delta + z·se, z = Φ⁻¹(confidence) ("a is worse than b by more than t" is shown
    with that confidence when bound < -t). `defined` is False, and the undefined fields NaN, when a
    class is empty (no AUC) or has a single row (no variance: the AUCs are still given then).
    """

    auc_a: float
    auc_b: float
    delta: float
    se: float
    lower: float
    upper: float
    bound: float
    confidence: float
    positives: int
    negatives: int
    defined: bool


def paired_auc_test(score_a: np.ndarray, score_b: np.ndarray, label: np.ndarray,
                    confidence: float = 0.95) -> PairedAUC:
    """DeLong, DeLong & Clarke-Pearson (1988) for two correlated AUCs scored on the same rows.

    delta = AUC_a - AUC_b; its variance is S10/m + S01/n over the per-positive and per-negative
    differences of the structural components (sample variances, m positives, n negatives). The
    components come from midranks as in Sun & Xu (2014): three sorts per score, O(N log N), no
    per-row loop. Ties count one half, so the AUCs equal `auc`. Scores must be finite.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    a = np.asarray(score_a, np.float64).ravel()
    b = np.asarray(score_b, np.float64).ravel()
    pos = np.asarray(label).ravel() > 0
    if not a.size == b.size == pos.size:
        raise ValueError(f"paired AUC test needs the same rows: {a.size}, {b.size} scores, {pos.size} labels")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired AUC test needs finite scores")
    m = int(pos.sum())
    n = int(pos.size - m)
    nan = float("nan")
    if m == 0 or n == 0:
        return PairedAUC(nan, nan, nan, nan, nan, nan, nan, confidence, m, n, False)
    v10a, v01a = _structural_components(a, pos)
    v10b, v01b = _structural_components(b, pos)
    auc_a, auc_b = float(v10a.mean()), float(v10b.mean())
    delta = float((v10a - v10b).mean())                # exactly 0 for identical scores
    if m < 2 or n < 2:
        return PairedAUC(auc_a, auc_b, delta, nan, nan, nan, nan, confidence, m, n, False)
    var = float((v10a - v10b).var(ddof=1) / m + (v01a - v01b).var(ddof=1) / n)
    se = float(np.sqrt(max(var, 0.0)))
    z2 = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    z1 = NormalDist().inv_cdf(confidence)
    return PairedAUC(auc_a, auc_b, delta, se, delta - z2 * se, delta + z2 * se, delta + z1 * se,
                     confidence, m, n, True)


def auc_se(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(AUC, DeLong standard error) of one score: var = var(V10)/m + var(V01)/n over the structural
    components (the single-AUC case of `paired_auc_test`, same midranks, three sorts). The AUC is
    NaN when a class is empty; the error is NaN also when a class has a single row or a score is
    not finite (a report shows "–" then rather than failing)."""
    s = np.asarray(scores, np.float64).ravel()
    pos = np.asarray(labels).ravel() > 0
    m = int(pos.sum())
    n = int(pos.size - m)
    nan = float("nan")
    if m == 0 or n == 0 or not np.isfinite(s).all():
        return (nan if m == 0 or n == 0 else auc(s, pos)), nan
    v10, v01 = _structural_components(s, pos)
    if m < 2 or n < 2:
        return float(v10.mean()), nan
    var = float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    return float(v10.mean()), float(np.sqrt(max(var, 0.0)))


def auc_ci(scores: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided `confidence` interval of the AUC, AUC ± z·se(DeLong), clipped to [0, 1]; how far
    one day's AUC can be trusted, e.g. on a rare task's few hundred positives. (NaN, NaN) where
    the standard error is undefined (see `auc_se`)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    a, se = auc_se(scores, labels)
    if not (math.isfinite(a) and math.isfinite(se)):
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    return max(0.0, a - z * se), min(1.0, a + z * se)


def pcoc_ci(scores: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided `confidence` interval of PCOC (Σp / positives) from the evaluation day's own noise.

    The positives are a sum of Bernoulli outcomes, so on a few hundred of them a perfectly calibrated
    model reads anywhere within ±10 % of 1. Their variance Σ q(1−q) is taken at q = p rescaled to the
    observed rate; the interval is Σp / (positives ± z·sd), with +inf above where positives ≤ z·sd.
    (NaN, NaN) without positives or predictions."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    p = np.asarray(scores, dtype=np.float64)
    pos = float((np.asarray(labels) > 0).sum())
    total = float(p.sum())
    if pos == 0 or total <= 0:
        return float("nan"), float("nan")
    q = np.minimum(p * (pos / total), 1.0)
    sd = math.sqrt(float((q * (1.0 - q)).sum()))
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    low = pos - z * sd
    return total / (pos + z * sd), total / low if low > 0 else float("inf")
