"""Offline metrics against straightforward references (sklearn, per-group loops)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from mtrank.pipeline.metrics import auc, calibration_bins, expected_auc, gauc, logloss, normalized_entropy


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


# ------------------------------------------------------------------ DeLong paired AUC test

def _delong_bruteforce(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """DeLong et al. (1988) literally: the O(m·n) kernel matrix, structural components, their
    covariance matrices S10, S01, and var(AUC_a - AUC_b) = c' (S10/m + S01/n) c with c = (1, -1)."""
    pos = y > 0
    comps10, comps01, aucs = [], [], []
    for s in (a, b):
        x, z = s[pos][:, None], s[~pos][None, :]
        psi = (x > z) + 0.5 * (x == z)               # m x n
        aucs.append(psi.mean())
        comps10.append(psi.mean(axis=1))
        comps01.append(psi.mean(axis=0))
    m, n = int(pos.sum()), int((~pos).sum())
    s = np.cov(np.array(comps10)) / m + np.cov(np.array(comps01)) / n
    c = np.array([1.0, -1.0])
    return aucs[0], aucs[1], float(c @ s @ c)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.booleans()), min_size=4, max_size=120))
def test_paired_auc_test_matches_the_bruteforce_delong(rows):
    from mtrank.pipeline.metrics import paired_auc_test

    a = np.array([r[0] for r in rows], float)     # few distinct scores: ties within and across classes
    b = np.array([r[1] for r in rows], float)
    y = np.array([r[2] for r in rows])
    r = paired_auc_test(a, b, y)
    m, n = int(y.sum()), int((~y).sum())
    assert (r.positives, r.negatives) == (m, n)
    if m == 0 or n == 0:
        assert not r.defined and np.isnan(r.auc_a) and np.isnan(r.delta) and np.isnan(r.se)
        return
    assert r.auc_a == pytest.approx(auc(a, y), abs=1e-12) and r.auc_b == pytest.approx(auc(b, y), abs=1e-12)
    assert r.delta == pytest.approx(auc(a, y) - auc(b, y), abs=1e-12)
    if m < 2 or n < 2:                            # one row of a class: AUCs, but no variance
        assert not r.defined and np.isnan(r.se)
        return
    auc_a, auc_b, var = _delong_bruteforce(a, b, y)
    assert r.defined and (r.auc_a, r.auc_b) == pytest.approx((auc_a, auc_b), abs=1e-12)
    assert r.se ** 2 == pytest.approx(var, rel=1e-9, abs=1e-15)


def test_paired_auc_test_on_random_continuous_scores_matches_bruteforce():
    from mtrank.pipeline.metrics import paired_auc_test

    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(10, 300))
        y = rng.random(n) < rng.uniform(0.05, 0.6)
        if y.sum() < 2 or (~y).sum() < 2:
            continue
        a = y + rng.normal(0, 1.0, n)
        b = 0.7 * a + rng.normal(0, 0.8, n)
        r = paired_auc_test(a, b, y, confidence=0.9)
        auc_a, auc_b, var = _delong_bruteforce(a, b, y)
        assert (r.auc_a, r.auc_b) == pytest.approx((auc_a, auc_b), abs=1e-12)
        assert r.se ** 2 == pytest.approx(var, rel=1e-9)
        z2, z1 = 1.6448536269514722, 1.2815515655446004   # Phi^-1(0.95), Phi^-1(0.90)
        assert r.lower == pytest.approx(r.delta - z2 * r.se) and r.upper == pytest.approx(r.delta + z2 * r.se)
        assert r.bound == pytest.approx(r.delta + z1 * r.se)


def test_paired_auc_variance_matches_replicates():
    """The standard error predicts the spread of delta over independent draws of the day."""
    from mtrank.pipeline.metrics import paired_auc_test

    rng = np.random.default_rng(5)
    deltas, variances = [], []
    for _ in range(500):
        n = 4000
        y = rng.random(n) < 0.05                      # ~200 positives: a rare task
        signal = y * 1.0 + rng.normal(0, 1.0, n)
        a = signal + rng.normal(0, 0.5, n)           # two correlated models of the same signal
        b = signal + rng.normal(0, 0.7, n)
        r = paired_auc_test(a, b, y)
        deltas.append(r.delta)
        variances.append(r.se ** 2)
    ratio = np.var(deltas, ddof=1) / np.mean(variances)
    assert 0.75 < ratio < 1.33, ratio


def test_paired_auc_test_identical_scores_and_edge_cases():
    from mtrank.pipeline.metrics import paired_auc_test

    rng = np.random.default_rng(2)
    y = rng.random(1000) < 0.1
    s = np.round(rng.random(1000), 2)
    r = paired_auc_test(s, s.copy(), y)
    assert r.defined and r.delta == 0.0 and r.se == 0.0 and r.lower == r.upper == r.bound == 0.0
    assert r.auc_a == r.auc_b == pytest.approx(auc(s, y))
    none = paired_auc_test(s, s, np.zeros(1000))
    assert not none.defined and none.positives == 0 and none.negatives == 1000 and np.isnan(none.auc_a)
    with pytest.raises(ValueError, match="finite"):
        paired_auc_test(np.full(1000, np.nan), s, y)
    with pytest.raises(ValueError, match="same rows"):
        paired_auc_test(s[:10], s, y)
    with pytest.raises(ValueError, match="confidence"):
        paired_auc_test(s, s, y, confidence=1.0)


def test_paired_auc_test_handles_a_large_day():
    """2M rows in one vectorised pass (about a second here; speed itself is not asserted)."""
    from mtrank.pipeline.metrics import paired_auc_test

    rng = np.random.default_rng(0)
    n = 2_000_000
    y = rng.random(n) < 0.02
    a = rng.random(n).astype(np.float32)
    r = paired_auc_test(a, a + rng.normal(0, 0.01, n).astype(np.float32), y)
    assert r.defined and r.positives == int(y.sum()) and r.negatives == n - int(y.sum())


# ------------------------------------------------------------------ single-AUC DeLong interval

def _delong_single_bruteforce(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(AUC, var) by DeLong literally: the m x n kernel matrix and its row / column means."""
    pos = y > 0
    x, z = s[pos][:, None], s[~pos][None, :]
    psi = (x > z) + 0.5 * (x == z)
    m, n = psi.shape
    return float(psi.mean()), float(psi.mean(axis=1).var(ddof=1) / m + psi.mean(axis=0).var(ddof=1) / n)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=150))
def test_auc_ci_matches_the_bruteforce_delong(rows):
    from statistics import NormalDist

    from mtrank.pipeline.metrics import auc_ci, auc_se

    s = np.array([r[0] for r in rows], float)     # few distinct scores: ties within and across classes
    y = np.array([r[1] for r in rows])
    m, n = int(y.sum()), int((~y).sum())
    a, se = auc_se(s, y)
    lo, hi = auc_ci(s, y)
    if m < 2 or n < 2:                            # no AUC, or an AUC without variance: no interval
        assert np.isnan(se) and np.isnan(lo) and np.isnan(hi)
        assert np.isnan(a) if m == 0 or n == 0 else a == pytest.approx(auc(s, y), abs=1e-12)
        return
    ref_auc, ref_var = _delong_single_bruteforce(s, y)
    assert a == pytest.approx(ref_auc, abs=1e-12) and a == pytest.approx(auc(s, y), abs=1e-12)
    assert se ** 2 == pytest.approx(ref_var, rel=1e-9, abs=1e-15)
    z = NormalDist().inv_cdf(0.975)
    assert lo == pytest.approx(max(0.0, a - z * se), abs=1e-12) and hi == pytest.approx(min(1.0, a + z * se), abs=1e-12)
    assert 0.0 <= lo <= a <= hi <= 1.0


def test_auc_ci_covers_the_true_auc_at_its_confidence():
    """Binormal scores with a known AUC Φ(d/√2): the 95 % interval covers it in ~95 % of the days."""
    from statistics import NormalDist

    from mtrank.pipeline.metrics import auc_ci

    rng = np.random.default_rng(7)
    d = 1.0
    true_auc = NormalDist().cdf(d / np.sqrt(2))
    covered, widths = [], []
    for _ in range(600):
        y = rng.random(3000) < 0.05               # ~150 positives: a rare task
        s = y * d + rng.normal(0, 1, y.size)
        lo, hi = auc_ci(s, y)
        covered.append(lo <= true_auc <= hi)
        widths.append(hi - lo)
    assert 0.92 < np.mean(covered) < 0.98, np.mean(covered)   # binomial sd 0.009 over 600 days
    assert 0.05 < np.mean(widths) < 0.15          # ~150 positives: an AUC known to a few points only


def test_auc_ci_edge_cases():
    from mtrank.pipeline.metrics import auc_ci

    s = np.linspace(0, 1, 100)
    assert auc_ci(s, s > 0.5) == (1.0, 1.0)       # perfectly separated: se 0, clipped to [0, 1]
    assert all(np.isnan(auc_ci(s, np.zeros(100))))
    bad = s.copy()
    bad[3] = np.nan
    assert all(np.isnan(auc_ci(bad, s > 0.5)))    # a report shows "–" rather than failing
    with pytest.raises(ValueError, match="confidence"):
        auc_ci(s, s > 0.5, confidence=0.0)


def test_pcoc_interval_covers_one_for_a_calibrated_model_at_its_confidence():
    """Labels drawn from the predictions themselves (a perfectly calibrated model, truth known): the
    95 % interval holds 1 in about 95 % of simulated days, and it is as wide as a few hundred
    positives make it; a model 20 % too high is outside it on most days."""
    from mtrank.pipeline.metrics import pcoc_ci

    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 8.0, 5_000)            # ~7 % mean rate: ~350 positives a day
    covered, too_high, widths = 0, 0, []
    for _ in range(400):
        y = (rng.random(p.size) < p).astype(np.int8)
        lo, hi = pcoc_ci(p, y)
        covered += lo <= 1.0 <= hi
        widths.append(hi - lo)
        lo2, _ = pcoc_ci(1.2 * p, y)
        too_high += lo2 > 1.0
    assert 0.92 <= covered / 400 <= 0.98, covered
    assert 0.15 < np.median(widths) < 0.25    # ±~10 % on ~350 positives
    assert too_high / 400 > 0.9
    assert all(np.isnan(pcoc_ci(p, np.zeros(p.size))))
    lo, hi = pcoc_ci(np.full(10, 0.1), np.eye(10)[0])   # one positive: no upper bound
    assert lo > 0 and hi == float("inf")
    with pytest.raises(ValueError, match="confidence"):
        pcoc_ci(p, y, confidence=1.0)
