"""The promotion gate on synthetic predictions: every binary figure is gated whatever its name,
noise does not reject, and a gate that cannot compare anything is an error."""
import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import yaml

from mtrank.jobs import promote as gate_mod
from mtrank.jobs.config import PromoteConfig
from mtrank.jobs.promote import GateError, compare
from mtrank.pipeline.evaluate import BinarySet


def fig(name, score, label, population="all"):
    return BinarySet(name=name, population=population, score=np.asarray(score, np.float64),
                     label=np.asarray(label).astype(np.int8), oracle=None, group=None)


def binormal(auc_target, y, noise):
    """Scores whose AUC is about `auc_target`: shift d = √2·Φ⁻¹(AUC) between the classes."""
    return y * np.sqrt(2) * NormalDist().inv_cdf(auc_target) + noise


@pytest.fixture(scope="module")
def census():
    """Tasks named like nothing in any default: 6000 rows, a 95 % champion on both."""
    rng = np.random.default_rng(1)
    n = 6000
    income, married = rng.random(n) < 0.25, rng.random(n) < 0.4
    champion = {"income": fig("income", binormal(0.95, income, rng.normal(0, 1, n)), income),
                "never_married": fig("never_married", binormal(0.95, married, rng.normal(0, 1, n)), married)}
    worse = {"income": fig("income", binormal(0.80, income, rng.normal(0, 1, n)), income),
             "never_married": champion["never_married"]}
    return champion, worse


def test_clearly_worse_task_with_an_unconfigured_name_is_rejected(census):
    champion, challenger = census
    g = compare(challenger, champion, PromoteConfig())
    assert not g.promoted and g.verdict == "worse on income"
    by = {f.name: f for f in g.figures}
    assert set(by) == {"income", "never_married"}                     # every figure gated, none configured
    inc = by["income"]
    assert inc.outcome == "fail" and inc.tolerance == 0.002
    assert 0.79 < inc.auc_challenger < 0.82 and 0.94 < inc.auc_champion < 0.96
    assert inc.ci_lower < inc.delta < inc.bound < inc.ci_upper < -0.1
    assert by["never_married"].outcome == "pass" and by["never_married"].delta == 0.0
    assert by["never_married"].se == 0.0
    assert "income 0." in g.reason and "-> FAIL" in g.reason and "never_married" in g.reason
    t = g.tags()
    assert t["gate.income.outcome"] == "fail" and t["gate.never_married.outcome"] == "pass"
    assert t["gate.income.delta"].startswith("-0.1")
    lo, hi = json.loads(t["gate.income.ci"])
    assert lo == pytest.approx(inc.ci_lower, abs=1e-6) and hi == pytest.approx(inc.ci_upper, abs=1e-6)
    assert "\n" not in t["promotion.rule"] and "one-sided 95%" in t["promotion.rule"]


def small_difference():
    """93 positives among 12,000 rows; two models of the same signal, challenger -0.007 AUC."""
    rng = np.random.default_rng(10)
    n = 12_000
    y = np.zeros(n, bool)
    y[rng.choice(n, 93, replace=False)] = True
    base = y * 1.2 + rng.normal(0, 1, n)
    champion = fig("cvr", base + rng.normal(0, 0.3, n), y, "ctr")
    return fig("cvr", base + rng.normal(0, 0.3, n), y, "ctr"), champion


def test_small_difference_on_93_positives_is_noise_not_a_rejection():
    challenger, champion = small_difference()
    g = compare({"cvr": challenger}, {"cvr": champion}, PromoteConfig())
    (f,) = g.figures
    assert f.positives == 93 and -0.009 < f.delta < -0.006            # the old rule (delta < -tol) rejected this
    assert f.ci_lower < -0.02 and f.ci_upper > 0.01 and f.bound > -0.002
    assert f.outcome == "pass" and g.promoted
    assert "not worse beyond tolerance at 95 %" in g.reason
    assert f"cvr {f.auc_challenger:.4f} vs {f.auc_champion:.4f} {f.delta:+.4f} [" in g.reason
    # the same difference with ten times the evidence is a regression (same shift, more rows)
    big = {"cvr": fig("cvr", np.tile(challenger.score, 40), np.tile(challenger.label, 40), "ctr")}
    base = {"cvr": fig("cvr", np.tile(champion.score, 40), np.tile(champion.label, 40), "ctr")}
    assert not compare(big, base, PromoteConfig()).promoted


def test_confidence_and_tolerance_override_move_the_line():
    challenger, champion = small_difference()
    loose = compare({"cvr": challenger}, {"cvr": champion}, PromoteConfig(confidence=0.51))
    assert loose.figures[0].bound == pytest.approx(loose.figures[0].delta + NormalDist().inv_cdf(0.51)
                                                   * loose.figures[0].se)
    assert not loose.promoted                                         # barely any confidence asked for
    kept = compare({"cvr": challenger}, {"cvr": champion}, PromoteConfig(confidence=0.51, tolerances={"cvr": 0.01}))
    assert kept.promoted and kept.figures[0].tolerance == 0.01


def test_skip_opts_a_figure_out(census):
    champion, challenger = census
    g = compare(challenger, champion, PromoteConfig(skip=["income"]))
    assert g.promoted and [f.name for f in g.figures] == ["never_married"]
    assert "skipped: income" in g.reason and g.skipped == ("income",)
    assert "gate.income.outcome" not in g.tags()


def test_everything_skipped_or_no_binary_task_is_an_error(census):
    champion, challenger = census
    with pytest.raises(GateError, match="leaves no figure to compare"):
        compare(challenger, champion, PromoteConfig(skip=["income", "never_married"]))
    with pytest.raises(GateError, match="no binary task"):
        compare({}, champion, PromoteConfig())


def test_unknown_names_are_errors_listing_the_valid_ones(census):
    champion, challenger = census
    with pytest.raises(GateError, match=r"promote\.tolerances names 'ctcvr', 'ctr'.*valid: income, never_married"):
        compare(challenger, champion, PromoteConfig(tolerances={"ctcvr": 0.003, "ctr": 0.002}))
    with pytest.raises(GateError, match=r"promote\.skip names 'incme'.*valid: income, never_married"):
        compare(challenger, champion, PromoteConfig(skip=["incme"]))


def test_undefined_auc_is_not_promoted_and_says_why(census):
    champion, challenger = census
    none = np.zeros(500, bool)
    one = none.copy()
    one[3] = True
    rng = np.random.default_rng(0)
    s = rng.random(500)
    for labels, why in ((none, "0 positives, 500 negatives: no AUC"), (one, "1 positives, 499 negatives: no variance")):
        cha = {**challenger, "rare": fig("rare", s, labels, "income")}
        chm = {**champion, "rare": fig("rare", s, labels, "income")}
        g = compare(cha, chm, PromoteConfig())
        assert not g.promoted
        assert g.verdict == f"worse on income; undefined AUC on rare ({why})"
        assert g.tags()["gate.rare.outcome"] == "undefined" and g.tags()["gate.rare.delta"] in ("nan", "0.000000")
    g = compare({"rare": fig("rare", s, none)}, {"rare": fig("rare", s, none)}, PromoteConfig())
    assert not g.promoted and g.verdict.startswith("undefined AUC on rare")
    bad = s.copy()
    bad[7] = np.nan
    g = compare({"rare": fig("rare", bad, one)}, {"rare": fig("rare", s, one)}, PromoteConfig())
    assert not g.promoted and "non-finite scores from the challenger" in g.reason


def test_rows_must_pair_and_figures_are_intersected(census):
    champion, challenger = census
    shuffled = {**challenger, "income": fig("income", challenger["income"].score,
                                            np.roll(challenger["income"].label, 1))}
    with pytest.raises(GateError, match="income: the challenger and the champion were not evaluated on the same rows"):
        compare(shuffled, champion, PromoteConfig())
    g = compare({"never_married": challenger["never_married"], "new": challenger["income"]},
                {"never_married": champion["never_married"], "old": champion["income"]}, PromoteConfig())
    assert [f.name for f in g.figures] == ["never_married"] and g.promoted
    assert g.not_comparable == {"new": "challenger only", "old": "champion only"}
    assert "not comparable: new (challenger only), old (champion only)" in g.reason
    with pytest.raises(GateError, match="none of the challenger's gated figures"):
        compare({"new": challenger["income"]}, {"old": champion["income"]}, PromoteConfig())


def test_promote_config():
    assert PromoteConfig().tolerances == {} and PromoteConfig().skip == []    # no task name built in
    assert PromoteConfig().tolerance == 0.002 and PromoteConfig().confidence == 0.95
    for bad in ({"confidence": 0.5}, {"confidence": 1.0}, {"tolerance": -0.1}, {"tolerances": {"a": -1}},
                {"skip": ["a"], "tolerances": {"a": 0.1}}, {"tolerances_typo": {}}):
        with pytest.raises(ValueError):
            PromoteConfig(**bad)
    raw = yaml.safe_load((Path(gate_mod.__file__).with_name("default_job.yaml")).read_text())
    demo = PromoteConfig.model_validate(raw["promote"])                       # the demo job's gate
    assert demo.tolerance == 0.002 and demo.confidence == 0.95
    assert demo.tolerances == {"ctcvr": 0.003, "cvr": 0.005, "collect": 0.005, "cart": 0.005}
