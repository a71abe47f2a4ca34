"""Offline metrics against straightforward references (sklearn, per-group loops)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from pipeline.metrics import auc, calibration_bins, gauc, logloss, normalized_entropy


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=200))
def test_auc_matches_sklearn_with_heavy_ties(rows):
    s = np.array([r[0] for r in rows], float)   # few distinct scores: many ties
    y = np.array([r[1] for r in rows])
    if y.all() or not y.any():
        assert np.isnan(auc(s, y))
        return
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


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
