"""Scoring stage properties: fusion, N-pick-1, traffic caps, boosts, output shape.

The oracle is bench/scoring_loop.py, the plain per-request loop the benchmark also times: the
vectorised stage must agree with it exactly (ranks and rule flags) on every generated case.

Fusion is configured as named factors resolved against a spec's OutputSchema; DEMO is the demo
job's formula pCTR·(α+pCVR)·(β+price)·stay^a·cart^b·collect^c over the default spec's outputs.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.scoring_loop import score_loop
from mtrank.features.spec import load_spec
from mtrank.jobs.config import load_config
from mtrank.pipeline.scoring import Fate, ScoringConfig, ScoringError, score_candidates
from mtrank.pipeline.scoring.config import Factor, FusionConfig, WindowRule
from mtrank.pipeline.scoring.fusion import FusionPlan, fuse, recalibrate, resolve
from mtrank.pipeline.scoring.rerank import rerank
from tests.conftest import other_names_spec

TASKS = ("p_ctr", "p_cvr", "p_cart", "p_collect")
SPEC = load_spec()
SCHEMA = SPEC.outputs
DEMO = load_config().score.fusion     # the demo job's six factors
DEMO_PLAN = resolve(DEMO, SCHEMA)


def scoring(**over) -> tuple[ScoringConfig, FusionPlan]:
    """ScoringConfig defaults with the demo's fusion (unless `fusion` is given), and its plan."""
    cfg = ScoringConfig.model_validate({"fusion": DEMO, **over})
    return cfg, resolve(cfg.fusion, SCHEMA)


def with_price(on_bad_value: str) -> FusionConfig:
    """The demo formula with the price factor's on_bad_value set."""
    return DEMO.model_copy(update={"factors": tuple(
        f.model_copy(update={"on_bad_value": on_bad_value}) if f.column == "price" else f for f in DEMO.factors)})


def candidates(rng: np.random.Generator, n_req: int, per: tuple[int, int], n_items: int, n_cats: int,
               coarse: bool = False) -> tuple[pa.Table, dict]:
    sizes = rng.integers(per[0], per[1] + 1, n_req)
    req = np.repeat(np.arange(n_req), sizes)
    items = np.concatenate([rng.choice(n_items, s, replace=False) for s in sizes])
    n = len(req)
    cat = (items * 7 + 3) % n_cats
    cat_arr = pa.array(cat, pa.int64(), mask=rng.random(n) < 0.05)
    table = pa.table({
        "request_id": pa.array([f"q{r:04d}" for r in req]),
        "item_id": pa.array(items, pa.int64()),
        "ts": pa.array(rng.integers(0, 1000, n_req)[req] * 1_000_000, pa.timestamp("us")),
        "category_id": cat_arr,
        "price": pa.array(np.where(rng.random(n) < 0.05, np.nan, np.round(rng.lognormal(2, 1, n), 2))),
        "item_age_days": pa.array(rng.integers(0, 30, n).astype(float)),
        "in_campaign": pa.array(items % 11 == 0),
        "quality_score": pa.array(rng.random(n)),
    })
    # coarse outputs make score ties common: the tie-break must still be deterministic
    draw = (lambda: rng.integers(1, 5, n) / 5) if coarse else (lambda: rng.random(n))
    outputs = {k: draw() for k in TASKS}
    outputs["stay"] = rng.exponential(30, n)
    return table, outputs


def by_key(table: pa.Table) -> dict:
    d = table.to_pydict()
    return {(r, i): (k or 0, f) for r, i, k, f in zip(d["request_id"], d["item_id"], d["rank"], d["rule_flags"])}


def loop_by_key(table: pa.Table, rank, flags) -> dict:
    d = table.to_pydict()
    return {(r, i): (k, f) for r, i, k, f in zip(d["request_id"], d["item_id"], rank, flags)}


def shown_lists(table: pa.Table) -> dict[str, list[int]]:
    d = table.to_pydict()
    lists: dict[str, list] = {}
    for r, i, k in zip(d["request_id"], d["item_id"], d["rank"]):
        if k is not None:
            lists.setdefault(r, []).append((k, i))
    return {r: [i for _, i in sorted(v)] for r, v in lists.items()}


# ------------------------------------------------------------------------------------------ fusion

def test_recalibration_inverts_negative_downsampling():
    """Truth known: keeping negatives at rate r turns p into q = p / (p + (1 - p) r); p' recovers p."""
    p = np.linspace(0.001, 0.999, 500)
    for r in (0.01, 0.1, 0.5, 1.0):
        q = p / (p + (1 - p) * r)
        np.testing.assert_allclose(recalibrate(q, r), p, rtol=1e-12)
    # and empirically: a down-sampled log's rate, recalibrated, is the full log's rate
    rng = np.random.default_rng(3)
    y = rng.random(400_000) < 0.04
    keep = y | (rng.random(y.size) < 0.1)
    assert abs(recalibrate(np.array([y[keep].mean()]), 0.1)[0] - y.mean()) < 0.002


def test_fusion_formula_and_factors():
    """The demo's factors are the mission formula with α = 0.05, β = 1, a = 0.2, b = 0.2, c = 0.1."""
    assert DEMO_PLAN.formula() == ("p_ctr · (0.05 + p_cvr) · (1 + price) · stay^0.2 · p_cart^0.2 · "
                                   "p_collect^0.1 · rule_weight")
    assert DEMO_PLAN.factor_columns == ("factor_p_ctr", "factor_p_cvr", "factor_price", "factor_stay",
                                        "factor_p_cart", "factor_p_collect")
    p = DEMO_PLAN.params()
    alpha, beta = p["p_cvr.offset"], p["price.offset"]
    a, b, c = p["stay.exponent"], p["p_cart.exponent"], p["p_collect.exponent"]
    assert (alpha, beta, a, b, c) == (0.05, 1.0, 0.2, 0.2, 0.1)
    out = {"p_ctr": np.array([0.1]), "p_cvr": np.array([0.2]), "stay": np.array([30.0]),
           "p_cart": np.array([0.4]), "p_collect": np.array([0.3])}
    cols, flags, eligible = fuse(out, {"price": np.array([50.0])}, np.array([1.3]), DEMO_PLAN)
    expect = 0.1 * (alpha + 0.2) * (beta + 50) * 30 ** a * 0.4 ** b * 0.3 ** c * 1.3
    assert cols["score"][0] == pytest.approx(expect, rel=1e-12)
    assert cols["factor_price"][0] == beta + 50 and cols["rule_weight"][0] == 1.3
    assert cols["factor_p_cvr"][0] == pytest.approx(alpha + 0.2) and cols["factor_p_ctr"][0] == 0.1
    assert flags[0] == 0 and eligible[0]


def test_a_zero_exponent_switches_its_output_off_and_a_missing_one_is_named():
    plan = DEMO_PLAN.with_params({"stay.exponent": 0.0, "p_cart.exponent": 0.0})
    assert plan.required_outputs() == ["p_ctr", "p_cvr", "p_collect"]
    out = {"p_ctr": np.array([0.5]), "p_cvr": np.array([0.5]), "p_collect": np.array([0.25])}
    cols, _, _ = fuse(out, {"price": np.array([3.0])}, np.ones(1), plan)
    assert cols["factor_stay"][0] == cols["factor_p_cart"][0] == 1.0
    assert cols["score"][0] == pytest.approx(0.5 * 0.55 * 4.0 * 0.25 ** 0.1, rel=1e-12)
    with pytest.raises(ScoringError, match="no output stay, p_cart"):
        fuse(out, {"price": np.array([3.0])}, np.ones(1), DEMO_PLAN)


@settings(max_examples=60, deadline=None)
@given(task=st.sampled_from(["p_ctr", "p_cvr", "stay", "p_cart", "p_collect"]),
       base=st.floats(0.001, 0.98), bump=st.floats(0.001, 0.5),
       a=st.floats(0.01, 2), b=st.floats(0.01, 2), c=st.floats(0.01, 2))
def test_score_monotone_in_each_task(task, base, bump, a, b, c):
    plan = DEMO_PLAN.with_params({"stay.exponent": a, "p_cart.exponent": b, "p_collect.exponent": c})
    out = {k: np.array([base]) for k in TASKS}
    out["stay"] = np.array([base * 100])
    price = {"price": np.array([10.0])}
    lo, _, _ = fuse(out, price, np.ones(1), plan)
    up = dict(out)
    up[task] = np.minimum(out[task] + (bump * 100 if task == "stay" else bump), 1.0 if task != "stay" else 1e9)
    hi, _, _ = fuse(up, price, np.ones(1), plan)
    assert hi["score"][0] > lo["score"][0]


def test_nan_prediction_is_an_error_not_a_zero():
    out = {k: np.full(3, 0.5) for k in TASKS}
    out["stay"] = np.full(3, 10.0)
    out["p_cvr"][1] = np.nan
    price = {"price": np.full(3, 5.0)}
    with pytest.raises(ScoringError, match="p_cvr.*NaN.*'b'"):
        fuse(out, price, np.ones(3), DEMO_PLAN, ids=np.array(["a", "b", "c"]))
    out["p_cvr"][1] = 1.5
    with pytest.raises(ScoringError, match="p_cvr"):
        fuse(out, price, np.ones(3), DEMO_PLAN)
    out["p_cvr"][1] = 0.5
    out["stay"][2] = np.nan   # a regression output: any finite value, never NaN
    with pytest.raises(ScoringError, match="stay.*NaN"):
        fuse(out, price, np.ones(3), DEMO_PLAN)


def test_bad_price_rules():
    """on_bad_value of the price factor (a column factor) through the whole stage."""
    rng = np.random.default_rng(0)
    table, out = candidates(rng, 20, (5, 10), 200, 10)
    off, plan = scoring(list_size=None)
    off = off.rules_off()
    bad = ~(table["price"].to_numpy(zero_copy_only=False) > 0)
    assert bad.any()
    res = score_candidates(table, out, off, plan)
    flags = np.array(res.table["rule_flags"].to_pylist())
    price = np.array(res.table["factor_price"].to_pylist())
    defaulted = (flags & Fate.VALUE_DEFAULTED) != 0
    assert defaulted.sum() == bad.sum() and not (flags & Fate.FILTERED_VALUE).any()
    assert np.all(price[defaulted] == plan.params()["price.offset"])  # beta + 0
    assert res.table["rank"].null_count == 0  # "zero": still ranked
    filt, plan = scoring(fusion=with_price("filter"), list_size=None)
    res = score_candidates(table, out, filt.rules_off(), plan)
    flags = np.array(res.table["rule_flags"].to_pylist())
    assert res.table["rank"].null_count == bad.sum() == ((flags & Fate.FILTERED_VALUE) != 0).sum()
    assert res.table.filter(pa.array((flags & Fate.FILTERED_VALUE) != 0))["rank"].null_count == bad.sum()
    err, plan = scoring(fusion=with_price("error"))
    with pytest.raises(ScoringError, match="price.*on_bad_value.*first in request q"):
        score_candidates(table, out, err.rules_off(), plan)
    rank, flags_loop, _ = score_loop(table, out, filt.rules_off(), resolve(filt.fusion, SCHEMA))
    assert by_key(res.table) == loop_by_key(table, rank, flags_loop)


@pytest.mark.parametrize("rule", ["zero", "filter", "error"])
def test_on_bad_value_of_any_column_factor(rule):
    """A column factor reads any numeric candidate column; missing, NaN, 0 and negative are bad."""
    fc = FusionConfig(factors=[{"output": "p_ctr"},
                               {"column": "margin", "offset": 0.5, "exponent": 2.0, "on_bad_value": rule}])
    plan = resolve(fc, SCHEMA)
    assert plan.columns == ("margin",) and plan.factor_columns == ("factor_p_ctr", "factor_margin")
    margin = np.array([2.0, np.nan, 0.0, -3.0, 1.0])
    out = {"p_ctr": np.full(5, 0.5)}
    bad = np.array([False, True, True, True, False])
    if rule == "error":
        with pytest.raises(ScoringError, match="column 'margin': rule on_bad_value: 3 candidates"):
            fuse(out, {"margin": margin}, np.ones(5), plan)
        return
    cols, flags, eligible = fuse(out, {"margin": margin}, np.ones(5), plan)
    np.testing.assert_allclose(cols["factor_margin"], np.where(bad, 0.5, 0.5 + margin) ** 2)
    np.testing.assert_allclose(cols["score"], 0.5 * cols["factor_margin"])
    want = Fate.VALUE_DEFAULTED if rule == "zero" else Fate.FILTERED_VALUE
    assert ((flags & want) != 0).tolist() == bad.tolist()
    assert not (flags & ~int(want)).any()
    assert eligible.tolist() == ((~bad).tolist() if rule == "filter" else [True] * 5)
    with pytest.raises(ScoringError, match="no column 'margin'.*factor 'margin'"):
        fuse(out, {}, np.ones(5), plan)


# ---------------------------------------------------------------- a spec with other task names

OTHER = other_names_spec()
OTHER_FUSION = FusionConfig(factors=[
    {"output": "p_click_through"},
    {"output": "p_purchase", "offset": 0.01, "search": {"offset": {"lo": 0.001, "hi": 1.0}}},
    {"column": "price", "offset": 1.0, "search": {"offset": {"lo": 0.1, "hi": 1000.0}}},
    {"name": "watch", "output": "watch_time", "exponent": 0.5, "search": {"exponent": {"lo": 0.0, "hi": 2.0}}},
])
RENAME = {"p_ctr": "p_click_through", "p_cvr": "p_purchase", "stay": "watch_time"}


def test_other_task_names_are_fused_over_their_own_outputs():
    schema = OTHER.outputs
    assert schema.names == ("watch_time", "p_click_through", "p_purchase", "p_click_through_purchase")
    plan = resolve(OTHER_FUSION, schema)
    assert plan.factor_columns == ("factor_p_click_through", "factor_p_purchase", "factor_price", "factor_watch")
    assert set(plan.bounds()) == {"p_purchase.offset", "price.offset", "watch.exponent"}
    assert plan.required_outputs() == ["p_click_through", "p_purchase", "watch_time"]
    out = {"p_click_through": np.array([0.2]), "p_purchase": np.array([0.1]), "watch_time": np.array([16.0])}
    cols, flags, _ = fuse(out, {"price": np.array([50.0])}, np.array([2.0]), plan)
    assert cols["score"][0] == pytest.approx(2.0 * 0.2 * 0.11 * 51.0 * 4.0, rel=1e-12)
    assert cols["factor_watch"][0] == pytest.approx(4.0) and flags[0] == 0
    # the whole stage, and the loop, on that spec's outputs
    rng = np.random.default_rng(21)
    table, demo_out = candidates(rng, 40, (5, 20), 90, 5)
    out = {RENAME[k]: v for k, v in demo_out.items() if k in RENAME}
    cfg = ScoringConfig.model_validate({"fusion": OTHER_FUSION, "traffic_cap": {"default_cap": 5}, "list_size": 6})
    res = score_candidates(table, out, cfg, plan)
    assert {"factor_p_click_through", "factor_p_purchase", "factor_price", "factor_watch", "p_click_through",
            "watch_time"} <= set(res.table.column_names)
    assert not any(c in res.table.column_names for c in ("factor_p_ctr", "p_ctr", "factor_stay"))
    rank, flags, _ = score_loop(table, out, cfg, plan)
    assert by_key(res.table) == loop_by_key(table, rank, flags)


def test_an_output_the_model_does_not_have_is_named_with_the_valid_ones():
    bad = FusionConfig(factors=[{"output": "p_click_through"}, {"output": "p_ctr"}])
    with pytest.raises(ScoringError) as e:
        resolve(bad, OTHER.outputs)
    msg = str(e.value)
    assert "fusion.factors[1].output" in msg and "'p_ctr'" in msg
    for name in OTHER.outputs.names:
        assert name in msg
    # the demo's formula names the default spec's outputs: it does not fit this spec
    with pytest.raises(ScoringError, match="p_ctr.*p_click_through"):
        resolve(DEMO, OTHER.outputs)


def test_default_factors_rank_by_the_first_binary_all_rows_task():
    """factors: None ranks by the probability of the first binary task trained on all rows (here
    after a regression task listed first), on all rows: no candidate column is read."""
    for spec, name in ((SPEC, "p_ctr"), (OTHER, "p_click_through")):
        plan = resolve(FusionConfig(), spec.outputs)
        assert len(plan.factors) == 1 and plan.factors[0].output.name == name
        assert plan.required_outputs() == [name] and plan.columns == () and plan.bounds() == {}
        assert plan.formula() == f"{name} · rule_weight"
    rng = np.random.default_rng(4)
    table, out = candidates(rng, 30, (3, 12), 60, 4, coarse=True)
    cfg = ScoringConfig().rules_off().model_copy(update={"list_size": None})
    assert cfg.fusion.factors is None
    plan = resolve(cfg.fusion, SCHEMA)
    res = score_candidates(table.drop(["price"]), {"p_ctr": out["p_ctr"]}, cfg, plan)
    d = res.table.to_pydict()
    assert d["score"] == d["p_ctr"] and plan.factor_columns[0] in res.table.column_names
    assert not (np.array(d["rule_flags"]) & (Fate.VALUE_DEFAULTED | Fate.FILTERED_VALUE)).any()
    lists: dict = {}
    for r, i, k, p in zip(d["request_id"], d["item_id"], d["rank"], d["p_ctr"]):
        lists.setdefault(r, []).append((k, -p, i))
    for rows in lists.values():
        assert [k for k, _, _ in rows] == list(range(1, len(rows) + 1))
        assert rows == sorted(rows, key=lambda x: (x[1], x[2]))   # by pCTR, ties by item
    rank, flags, _ = score_loop(table, {"p_ctr": out["p_ctr"]}, cfg, plan)
    assert by_key(res.table) == loop_by_key(table, rank, flags)


def test_negative_keep_rate_recalibrates_a_probability_and_the_products_built_on_it():
    fc = FusionConfig(factors=[{"output": "p_cvr"}, {"output": "p_ctcvr"}, {"output": "p_ctcart"}],
                      negative_keep_rate={"cvr": 0.1, "ctr": 0.5})
    plan = resolve(fc, SCHEMA)
    # a re-calibrated product is rebuilt from its parts: they are needed, the logged product is not read
    assert {"p_ctr", "p_cvr", "p_cart"} <= set(plan.required_outputs())
    p_ctr, p_cvr, p_cart = np.array([0.2, 0.6]), np.array([0.3, 0.05]), np.array([0.4, 0.9])
    out = {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_cart": p_cart,
           "p_ctcvr": np.array([0.99, 0.99]), "p_ctcart": np.array([0.99, 0.99])}   # stale: never used
    cols, _, _ = fuse(out, {}, np.ones(2), plan)
    np.testing.assert_allclose(cols["factor_p_cvr"], recalibrate(p_cvr, 0.1), rtol=1e-12)
    np.testing.assert_allclose(cols["factor_p_ctcvr"], recalibrate(p_ctr, 0.5) * recalibrate(p_cvr, 0.1), rtol=1e-12)
    np.testing.assert_allclose(cols["factor_p_ctcart"], recalibrate(p_ctr, 0.5) * p_cart, rtol=1e-12)
    np.testing.assert_allclose(cols["score"], cols["factor_p_cvr"] * cols["factor_p_ctcvr"] * cols["factor_p_ctcart"],
                               rtol=1e-12)
    assert cols["factor_p_cvr"][0] < p_cvr[0]   # kept negatives at 10%: the true rate is lower
    with pytest.raises(ScoringError, match="no output p_ctr"):
        fuse({k: v for k, v in out.items() if k != "p_ctr"}, {}, np.ones(2), plan)
    # without a keep rate on its tasks, a product is read as the model emits it
    plain = resolve(FusionConfig(factors=[{"output": "p_ctcvr"}], negative_keep_rate={"cart": 0.5}), SCHEMA)
    assert plain.required_outputs() == ["p_ctcvr"]
    cols, _, _ = fuse({"p_ctcvr": np.array([0.07])}, {}, np.ones(1), plain)
    assert cols["score"][0] == 0.07
    # the loop agrees on a whole day with re-calibration in the formula
    rng = np.random.default_rng(8)
    table, out = candidates(rng, 30, (5, 15), 70, 5)
    out["p_ctcvr"] = out["p_ctr"] * out["p_cvr"]
    cfg = ScoringConfig.model_validate({"fusion": DEMO.model_copy(update={
        "factors": DEMO.factors + (Factor(output="p_ctcvr", exponent=0.5),),
        "negative_keep_rate": {"cvr": 0.2, "ctr": 0.7}}), "list_size": 7, "traffic_cap": {"default_cap": 4}})
    plan = resolve(cfg.fusion, SCHEMA)
    res = score_candidates(table, out, cfg, plan)
    rank, flags, _ = score_loop(table, out, cfg, plan)
    assert by_key(res.table) == loop_by_key(table, rank, flags)


def test_negative_keep_rate_of_an_unknown_task_lists_the_binary_tasks():
    for task in ("purchase", "stay", "ctcvr"):   # not a task; a regression task; a product
        with pytest.raises(ScoringError) as e:
            resolve(FusionConfig(negative_keep_rate={task: 0.5}), SCHEMA)
        assert f"negative_keep_rate.{task}" in str(e.value)
        assert "binary tasks are: cart, collect, ctr, cvr" in str(e.value)
    with pytest.raises(ScoringError, match="binary tasks are: click_through, purchase"):
        resolve(FusionConfig(negative_keep_rate={"ctr": 0.5}), OTHER.outputs)
    assert resolve(FusionConfig(negative_keep_rate={"purchase": 0.5}), OTHER.outputs).keep_rates == {"purchase": 0.5}


# ------------------------------------------------------------------------------------------ order

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), coarse=st.booleans())
def test_rules_off_is_a_pure_sort_by_score(seed, coarse):
    rng = np.random.default_rng(seed)
    table, out = candidates(rng, 6, (1, 15), 40, 5, coarse)
    cfg, plan = scoring(list_size=None)
    res = score_candidates(table, out, cfg.rules_off(), plan).table.to_pydict()
    lists: dict = {}
    for r, i, k, s in zip(res["request_id"], res["item_id"], res["rank"], res["score"]):
        lists.setdefault(r, []).append((k, -s, i))
    for rows in lists.values():
        assert [k for k, _, _ in rows] == list(range(1, len(rows) + 1))  # every candidate shown
        assert rows == sorted(rows, key=lambda x: (x[1], x[2]))         # by score, ties by item


def test_result_does_not_depend_on_input_row_order():
    rng = np.random.default_rng(11)
    table, out = candidates(rng, 60, (10, 30), 80, 6, coarse=True)
    cfg, plan = scoring(traffic_cap={"default_cap": 9}, list_size=8, window={"n": 3, "k": 1})
    a = by_key(score_candidates(table, out, cfg, plan).table)
    perm = rng.permutation(table.num_rows)
    b = by_key(score_candidates(table.take(pa.array(perm)), {k: v[perm] for k, v in out.items()}, cfg, plan).table)
    assert a == b


# ------------------------------------------------------------------------------------------ window

def window_violations(seq: list, n: int, k: int) -> list[int]:
    """Positions t whose item makes more than k of its value in the n slots ending at t.

    Any window holding more than k items of a value has such a position (its last item of that
    value), so an empty result means no window of the list breaks the rule."""
    return [t for t, x in enumerate(seq) if x is not None and seq[max(0, t - n + 1):t + 1].count(x) > k]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), n=st.integers(2, 5), k=st.integers(1, 2), cats=st.integers(1, 6),
       fallback=st.sampled_from(["end", "relax"]), size=st.one_of(st.none(), st.integers(1, 12)))
def test_window_rule_and_greedy_choice(seed, n, k, cats, fallback, size):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 16))
    score = rng.integers(1, 6, c) / 5.0         # ties on purpose
    attr = rng.integers(0, cats, c)
    attr[rng.random(c) < 0.1] = -1               # nulls share with nothing
    item = rng.permutation(c)
    win = WindowRule(n=n, k=k, fallback=fallback)
    res = rerank(np.zeros(c, dtype=np.int64), score, item, eligible=np.ones(c, bool), window=win,
                 attribute=attr, list_size=size)
    placed = sorted((int(r), i) for i, r in enumerate(res.rank) if r > 0)
    order = [i for _, i in placed]
    assert [r for r, _ in placed] == list(range(1, len(order) + 1))
    seq = [None if attr[i] < 0 else int(attr[i]) for i in order]
    relaxed = {t for t, i in enumerate(order) if res.flags[i] & Fate.WINDOW_RELAXED}
    assert set(window_violations(seq, n, k)) <= relaxed  # only marked fallback slots may break it
    if fallback == "end":
        assert not relaxed and not window_violations(seq, n, k)
    # greedy: at each slot, the pick is the best-scored remaining item that keeps the window valid
    remaining = set(range(c))
    for t, i in enumerate(order):
        remaining.discard(i)
        if t in relaxed:
            continue
        for j in remaining:
            fits = not window_violations(seq[max(0, t - n + 1):t] + [None if attr[j] < 0 else int(attr[j])], n, k)
            if fits:
                assert (score[j], -item[j]) <= (score[i], -item[i])
    limit = c if size is None else min(size, c)
    if len(order) < limit and fallback == "end":   # the list ended: nothing left fits the window
        t = len(order)
        for j in remaining:
            assert window_violations(seq[max(0, t - n + 1):t] + [int(attr[j])], n, k)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(2, 6), k=st.integers(1, 3))
def test_window_full_list_when_no_order_can_break_it(seed, n, k):
    """Every attribute value has at most k items: any order is valid, so nothing is deferred or cut."""
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 20))
    attr = np.repeat(np.arange(c), k)[:c]
    res = rerank(np.zeros(c, dtype=np.int64), rng.random(c), rng.permutation(c), eligible=np.ones(c, bool),
                 window=WindowRule(n=n, k=k), attribute=attr, list_size=None)
    assert sorted(res.rank.tolist()) == list(range(1, c + 1))
    assert not (res.flags & (Fate.WINDOW_DEFERRED | Fate.WINDOW_RELAXED)).any()


def genre_lists(rng: np.random.Generator, n: int, values: int, longest: int) -> pa.Array:
    """A list attribute as catalogues hold genres or tags: 0..longest values per row (repeats and
    null values inside, some null lists), strings."""
    lists = []
    for _ in range(n):
        u = rng.random()
        if u < 0.05:
            lists.append(None)
        else:
            vals = [f"g{v}" for v in rng.integers(0, values, int(rng.integers(0, longest + 1)))]
            if vals and u > 0.9:
                vals.append(None if u > 0.95 else vals[0])
            lists.append(vals)
    return pa.array(lists, pa.list_(pa.string()))


def set_violations(seq: list[set], n: int, k: int) -> list[int]:
    """window_violations for value sets: positions t holding a value more than k of the n slots
    ending at t hold."""
    return [t for t, vals in enumerate(seq)
            if any(sum(v in x for x in seq[max(0, t - n + 1):t + 1]) > k for v in vals)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), n=st.integers(2, 5), k=st.integers(1, 2), values=st.integers(1, 8),
       longest=st.integers(0, 4), fallback=st.sampled_from(["end", "relax"]), cap=st.integers(1, 6))
def test_a_list_attribute_window_matches_the_loop(seed, n, k, values, longest, fallback, cap):
    """window.attribute a list column (a film's genres): an item fits while none of its values is held
    by k items of the window. Ranks and flags equal the per-request loop's, caps included; with
    fallback end no window of a list holds any value more than k times."""
    rng = np.random.default_rng(seed)
    table, out = candidates(rng, int(rng.integers(1, 20)), (1, 14), 30, 4, coarse=bool(seed % 2))
    table = table.append_column("genres", genre_lists(rng, table.num_rows, values, longest))
    cfg, plan = scoring(traffic_cap={"default_cap": cap}, list_size=int(rng.integers(1, 10)),
                        window={"attribute": "genres", "n": n, "k": k, "fallback": fallback})
    res = score_candidates(table, out, cfg, plan)
    rank, flags, _ = score_loop(table, out, cfg, plan)
    assert by_key(res.table) == loop_by_key(table, rank, flags)
    genres = dict(zip(zip(table["request_id"].to_pylist(), table["item_id"].to_pylist()), table["genres"].to_pylist()))
    for r, items in shown_lists(res.table).items():
        seq = [{g for g in (genres[(r, i)] or []) if g is not None} for i in items]
        if fallback == "end":
            assert not set_violations(seq, n, k)


def test_one_value_lists_rank_as_the_plain_column():
    """[category] lists and the category column itself give the same ranks and flags (nulls: a null
    list and a null category share nothing)."""
    rng = np.random.default_rng(4)
    table, out = candidates(rng, 200, (10, 40), 300, 7)
    cat = table["category_id"].to_pylist()
    listed = table.append_column("category_list", pa.array([None if c is None else [c] for c in cat],
                                                           pa.list_(pa.int64())))
    for fallback in ("end", "relax"):
        cfg, plan = scoring(traffic_cap={"default_cap": 10}, list_size=12, window={"n": 4, "k": 1, "fallback": fallback})
        a = score_candidates(listed, out, cfg, plan)
        b = score_candidates(listed, out, cfg.model_copy(update={"window": cfg.window.model_copy(
            update={"attribute": "category_list"})}), plan)
        assert by_key(a.table) == by_key(b.table) and a.summary["rules"] == b.summary["rules"]
        assert a.summary["rules"]["window_deferred"] > 0


def test_a_list_attribute_too_long_to_read_is_one_error():
    rng = np.random.default_rng(1)
    table, out = candidates(rng, 3, (2, 4), 10, 3)
    long = [[f"t{i}" for i in range(70)]] + [["t1"]] * (table.num_rows - 1)
    table = table.append_column("tags", pa.array(long, pa.list_(pa.string())))
    cfg, plan = scoring(window={"attribute": "tags"})
    with pytest.raises(ScoringError, match=r"^column 'tags': rule window_list: a candidate lists 70 values; the "
                                           r"N-pick-1 rule reads at most 64"):
        score_candidates(table, out, cfg, plan)


# ------------------------------------------------------------------------------------------ caps

@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), cap=st.integers(0, 6), size=st.integers(1, 8),
       window=st.booleans(), prior=st.booleans())
def test_caps_never_exceeded_and_match_the_sequential_loop(seed, cap, size, window, prior):
    rng = np.random.default_rng(seed)
    table, out = candidates(rng, int(rng.integers(1, 25)), (1, 12), 30, 4, coarse=bool(seed % 2))
    items = np.unique(table["item_id"].to_numpy())
    seen = {int(i): int(rng.integers(0, 4)) for i in items[: len(items) // 2]} if prior else {}
    caps = {int(i): int(rng.integers(0, 8)) for i in items[::3]}
    cfg, plan = scoring(traffic_cap={"default_cap": cap}, list_size=size, window={"enabled": window, "n": 2, "k": 1})
    res = score_candidates(
        table, out, cfg, plan,
        caps=pa.table({"item_id": pa.array(list(caps), pa.int64()), "cap": pa.array(list(caps.values()), pa.int64())}),
        exposures=pa.table({"item_id": pa.array(list(seen), pa.int64()),
                            "exposures": pa.array(list(seen.values()), pa.int64())}))
    d = res.table.to_pydict()
    shown: dict = {}
    for i, k in zip(d["item_id"], d["rank"]):
        if k is not None:
            shown[i] = shown.get(i, 0) + 1
    for i, count in shown.items():
        assert seen.get(i, 0) + count <= caps.get(i, cap)
    rank, flags, _ = score_loop(table, out, cfg, plan, caps=caps, exposures=seen)
    assert by_key(res.table) == loop_by_key(table, rank, flags)


def test_all_rules_match_the_loop_on_a_larger_day():
    rng = np.random.default_rng(5)
    table, out = candidates(rng, 400, (20, 60), 600, 12)
    for fallback in ("end", "relax"):
        cfg, plan = scoring(traffic_cap={"default_cap": 12}, list_size=20,
                            window={"n": 4, "k": 1, "fallback": fallback}, low_quality={"action": "filter"})
        res = score_candidates(table, out, cfg, plan, campaign_items=pa.array([1, 2, 3], pa.int64()))
        assert res.summary["cap_rounds"] > 0 and res.summary["rules"]["capped"] > 0
        assert res.summary["rules"]["value_defaulted"] > 0
        rank, flags, _ = score_loop(table, out, cfg, plan, campaign_items={1, 2, 3})
        assert by_key(res.table) == loop_by_key(table, rank, flags)


# ------------------------------------------------------------------------------------------ output

def test_output_is_each_requests_candidates_once_with_explanations():
    rng = np.random.default_rng(9)
    table, out = candidates(rng, 50, (1, 30), 100, 5)
    cfg, plan = scoring(list_size=10, window={"fallback": "relax"}, low_quality={"action": "filter", "threshold": 0.6})
    res = score_candidates(table, out, cfg, plan)
    t = res.table
    assert t.num_rows == table.num_rows  # every candidate listed once, shown or not
    assert set(zip(t["request_id"].to_pylist(), t["item_id"].to_pylist())) == \
        set(zip(table["request_id"].to_pylist(), table["item_id"].to_pylist()))
    lists = shown_lists(t)
    quality = dict(zip(zip(table["request_id"].to_pylist(), table["item_id"].to_pylist()),
                       table["quality_score"].to_pylist()))
    d = t.to_pydict()
    for r in set(d["request_id"]):
        eligible = [i for (rr, i), q in quality.items() if rr == r and q >= 0.6]
        got = lists.get(r, [])
        assert len(got) == len(set(got)) == min(10, len(eligible))  # short requests return what is eligible
        assert set(got) <= set(eligible)
    filtered = [f for f, k in zip(d["rule_flags"], d["rank"]) if f & Fate.FILTERED_LOW_QUALITY]
    assert filtered and all("filtered_low_quality" in s for s, f in zip(d["rules"], d["rule_flags"])
                            if f & Fate.FILTERED_LOW_QUALITY)
    for name in ("score", "p_ctr", "p_cvr", "stay", "factor_p_ctr", "factor_p_cvr", "factor_price", "factor_stay",
                 "factor_p_cart", "factor_p_collect", "rule_weight"):
        assert name in t.column_names
    # boosts: rule_weight is the product of the multipliers the flags name
    for w, f in zip(d["rule_weight"], d["rule_flags"]):
        expect = (cfg.new_item.multiplier if f & Fate.BOOSTED_NEW else 1.0) * \
            (cfg.campaign.multiplier if f & Fate.BOOSTED_CAMPAIGN else 1.0)
        assert w == pytest.approx(expect)


def test_requests_served_in_time_order_for_caps():
    """Two requests want the same item with budget 1: the earlier request (by ts) gets it."""
    table = pa.table({"request_id": ["late", "early"], "item_id": [7, 7],
                      "ts": pa.array([2_000_000, 1_000_000], pa.timestamp("us")), "category_id": [1, 1],
                      "price": [1.0, 1.0], "item_age_days": [99.0, 99.0], "in_campaign": [False, False],
                      "quality_score": [1.0, 1.0]})
    out = {k: np.full(2, 0.5) for k in TASKS}
    out["stay"] = np.full(2, 5.0)
    cfg, plan = scoring(traffic_cap={"default_cap": 1})
    d = score_candidates(table, out, cfg, plan).table.to_pydict()
    got = dict(zip(d["request_id"], d["rank"]))
    assert got == {"early": 1, "late": None}
    assert d["request_id"] == ["early", "late"]  # listing follows serving order


def test_decimal_prices_and_string_campaign_flags_score_and_a_bad_flag_is_named():
    """What the candidate reader's kind check lets through is what the stage can read: a decimal
    price (warehouse exports) ranks as its float would, 'true'/'false' strings flag campaigns as
    booleans do, and a flag Arrow cannot read is one ScoringError naming the column."""
    import decimal

    from mtrank.pipeline.candidates import rule_column_kinds

    table, outputs = candidates(np.random.default_rng(3), 40, (5, 12), 200, 9)
    table = table.set_column(table.schema.get_field_index("price"), "price",
                             pa.array(np.nan_to_num(table["price"].to_numpy(), nan=1.0)))
    cfg, plan = scoring(campaign={"column": "in_campaign"})
    kinds = rule_column_kinds(cfg)
    price = pa.array([decimal.Decimal(f"{p:.2f}") for p in table["price"].to_pylist()], pa.decimal128(12, 2))
    flags = pa.array(["true" if f else "false" for f in table["in_campaign"].to_pylist()])
    assert kinds["price"][1](price.type) and kinds["in_campaign"][1](flags.type)
    assert not kinds["price"][1](pa.string()) and not kinds["category_id"][1](pa.list_(pa.list_(pa.int64())))
    assert kinds["category_id"][1](pa.list_(pa.dictionary(pa.int32(), pa.string())))   # genres, tags
    want = score_candidates(table, outputs, cfg, plan)
    got = score_candidates(table.set_column(table.schema.get_field_index("price"), "price", price)
                           .set_column(table.schema.get_field_index("in_campaign"), "in_campaign", flags),
                           outputs, cfg, plan)
    assert by_key(got.table) == by_key(want.table)
    bad = table.set_column(table.schema.get_field_index("in_campaign"), "in_campaign",
                           pa.array(["yes"] * table.num_rows))
    with pytest.raises(ScoringError, match="column 'in_campaign': rule wrong_type: campaign.column must hold"):
        score_candidates(bad, outputs, cfg, plan)
