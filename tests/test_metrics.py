"""Offline metrics against straightforward references (sklearn, per-group loops)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from pipeline.metrics import auc, calibration_bins, expected_auc, gauc, logloss, normalized_entropy


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=200))
def test_auc_matches_sklearn_with_heavy_ties(rows):
    s = np.array([r[0] for r in rows], float)   # few distinct scores: many ties
    y = np.array([r[1] for r in rows])
    if y.all() or not y.any():
        assert np.isnan(auc(s, y))
        return
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)



@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0.0, 1.0)), min_size=2, max_size=40))
def test_expected_auc_equals_the_pairwise_sum(rows):
    s = np.array([r[0] for r in rows], float)   # ties
    p = np.array([r[1] for r in rows])
    win = pairs = 0.0
    for i in range(s.size):
        for j in range(s.size):
            if i != j:
                w = p[i] * (1 - p[j])
                pairs += w
                win += w * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    if pairs <= 1e-12:
        return
    assert expected_auc(s, p) == pytest.approx(win / pairs, abs=1e-9)


def test_expected_auc_is_the_mean_auc_over_label_draws():
    rng = np.random.default_rng(3)
    p = rng.beta(1, 12, 3000)                   # rare positives, as for conversions
    s = np.round(p + rng.normal(0, 0.05, p.size), 2)   # a noisy, tied score
    draws = np.array([auc(s, rng.random(p.size) < p) for _ in range(400)])
    assert abs(draws.mean() - expected_auc(s, p)) < 4 * draws.std() / np.sqrt(draws.size)
    assert draws.std() > 0.005                  # one draw's AUC is noisy; the expectation is not
    assert expected_auc(p, p) > expected_auc(s, p) > 0.5
    assert expected_auc(np.zeros(p.size), p) == pytest.approx(0.5)
    assert expected_auc(-s, p) == pytest.approx(1 - expected_auc(s, p))

def test_gauc_equals_weighted_per_group_loop():
    rng = np.random.default_rng(0)
    n = 5000
    g = rng.integers(0, 300, n)
    s = np.round(rng.random(n), 2)                  # ties within groups
    y = rng.random(n) < 0.2 + 0.5 * s
    y[g == 7] = True                                # one-class groups are excluded
    y[g == 8] = False
    num = den = 0.0
    used = 0
    for k in np.unique(g):
        m = g == k
        if y[m].all() or not y[m].any():
            continue
        num += m.sum() * roc_auc_score(y[m], s[m])
        den += m.sum()
        used += 1
    value, groups = gauc(s, y, g)
    assert groups == used and value == pytest.approx(num / den, abs=1e-12)


def test_logloss_ne_and_calibration():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.3, 20000)
    y = rng.random(p.size) < p                      # perfectly calibrated by construction
    assert logloss(p, y) == pytest.approx(log_loss(y, p), rel=1e-9)
    rate = y.mean()
    assert normalized_entropy(np.full(p.size, rate), y) == pytest.approx(1.0, rel=1e-9)
    assert normalized_entropy(p, y) < 0.97
    cal = calibration_bins(p, y, bins=10)
    assert sum(cal["rows"]) == p.size and len(cal["rows"]) == 10
    assert np.allclose(cal["mean_pred"], cal["observed"], atol=0.02)
    assert cal["mean_pred"] == sorted(cal["mean_pred"])
    doubled = calibration_bins(np.minimum(2 * p, 1), y, bins=10)
    assert all(m > o for m, o in zip(doubled["mean_pred"], doubled["observed"]))
