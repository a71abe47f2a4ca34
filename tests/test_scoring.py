"""Scoring stage properties: fusion, N-pick-1, traffic caps, boosts, output shape.

The oracle is bench/scoring_loop.py, the plain per-request loop the benchmark also times: the
vectorised stage must agree with it exactly (ranks and rule flags) on every generated case.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.scoring_loop import score_loop
from pipeline.scoring import Fate, ScoringConfig, ScoringError, score_candidates
from pipeline.scoring.config import WindowRule
from pipeline.scoring.fusion import fuse, recalibrate
from pipeline.scoring.rerank import rerank

TASKS = ("p_ctr", "p_cvr", "p_cart", "p_collect")


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
    cfg = ScoringConfig().fusion
    out = {"p_ctr": np.array([0.1]), "p_cvr": np.array([0.2]), "stay": np.array([30.0]),
           "p_cart": np.array([0.4]), "p_collect": np.array([0.3])}
    cols, flags = fuse(out, np.array([50.0]), np.array([1.3]), cfg)
    expect = 0.1 * (cfg.alpha + 0.2) * (cfg.beta + 50) * 30 ** cfg.a * 0.4 ** cfg.b * 0.3 ** cfg.c * 1.3
    assert cols["score"][0] == pytest.approx(expect, rel=1e-12)
    assert cols["factor_price"][0] == cfg.beta + 50 and cols["rule_weight"][0] == 1.3
    assert flags[0] == 0


@settings(max_examples=60, deadline=None)
@given(task=st.sampled_from(["p_ctr", "p_cvr", "stay", "p_cart", "p_collect"]),
       base=st.floats(0.001, 0.98), bump=st.floats(0.001, 0.5),
       a=st.floats(0.01, 2), b=st.floats(0.01, 2), c=st.floats(0.01, 2))
def test_score_monotone_in_each_task(task, base, bump, a, b, c):
    cfg = ScoringConfig.model_validate({"fusion": {"a": a, "b": b, "c": c}}).fusion
    out = {k: np.array([base]) for k in TASKS}
    out["stay"] = np.array([base * 100])
    lo, _ = fuse(out, np.array([10.0]), np.ones(1), cfg)
    up = dict(out)
    up[task] = np.minimum(out[task] + (bump * 100 if task == "stay" else bump), 1.0 if task != "stay" else 1e9)
    hi, _ = fuse(up, np.array([10.0]), np.ones(1), cfg)
    assert hi["score"][0] > lo["score"][0]


def test_nan_prediction_is_an_error_not_a_zero():
    out = {k: np.full(3, 0.5) for k in TASKS}
    out["stay"] = np.full(3, 10.0)
    out["p_cvr"][1] = np.nan
    with pytest.raises(ScoringError, match="p_cvr.*NaN"):
        fuse(out, np.full(3, 5.0), np.ones(3), ScoringConfig().fusion, ids=np.array(["a", "b", "c"]))
    out["p_cvr"][1] = 1.5
    with pytest.raises(ScoringError, match="p_cvr"):
        fuse(out, np.full(3, 5.0), np.ones(3), ScoringConfig().fusion)


def test_bad_price_rules():
    rng = np.random.default_rng(0)
    table, out = candidates(rng, 20, (5, 10), 200, 10)
    off = ScoringConfig().rules_off()
    bad = ~(table["price"].to_numpy(zero_copy_only=False) > 0)
    assert bad.any()
    res = score_candidates(table, out, off.model_copy(update={"list_size": None}))
    flags = np.array(res.table["rule_flags"].to_pylist())
    price = np.array(res.table["factor_price"].to_pylist())
    defaulted = (flags & Fate.PRICE_DEFAULTED) != 0
    assert defaulted.sum() == bad.sum()
    assert np.all(price[defaulted] == off.fusion.beta)
    assert res.table["rank"].null_count == 0  # "zero": still ranked
    filt = off.model_copy(update={"fusion": off.fusion.model_copy(update={"bad_price": "filter"}), "list_size": None})
    res = score_candidates(table, out, filt)
    flags = np.array(res.table["rule_flags"].to_pylist())
    assert res.table["rank"].null_count == bad.sum() == ((flags & Fate.FILTERED_PRICE) != 0).sum()
    err = off.model_copy(update={"fusion": off.fusion.model_copy(update={"bad_price": "error"})})
    with pytest.raises(ScoringError, match="price.*bad_price"):
        score_candidates(table, out, err)


# ------------------------------------------------------------------------------------------ order

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), coarse=st.booleans())
def test_rules_off_is_a_pure_sort_by_score(seed, coarse):
    rng = np.random.default_rng(seed)
    table, out = candidates(rng, 6, (1, 15), 40, 5, coarse)
    cfg = ScoringConfig().rules_off().model_copy(update={"list_size": None})
    res = score_candidates(table, out, cfg).table.to_pydict()
    lists: dict = {}
    for r, i, k, s in zip(res["request_id"], res["item_id"], res["rank"], res["score"]):
        lists.setdefault(r, []).append((k, -s, i))
    for rows in lists.values():
        assert [k for k, _, _ in rows] == list(range(1, len(rows) + 1))  # every candidate shown
        assert rows == sorted(rows, key=lambda x: (x[1], x[2]))         # by score, ties by item


def test_result_does_not_depend_on_input_row_order():
    rng = np.random.default_rng(11)
    table, out = candidates(rng, 60, (10, 30), 80, 6, coarse=True)
    cfg = ScoringConfig.model_validate({"traffic_cap": {"default_cap": 9}, "list_size": 8,
                                        "window": {"n": 3, "k": 1}})
    a = by_key(score_candidates(table, out, cfg).table)
    perm = rng.permutation(table.num_rows)
    b = by_key(score_candidates(table.take(pa.array(perm)), {k: v[perm] for k, v in out.items()}, cfg).table)
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
    cfg = ScoringConfig.model_validate({"traffic_cap": {"default_cap": cap}, "list_size": size,
                                        "window": {"enabled": window, "n": 2, "k": 1}})
    res = score_candidates(
        table, out, cfg,
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
    rank, flags, _ = score_loop(table, out, cfg, caps=caps, exposures=seen)
    assert by_key(res.table) == loop_by_key(table, rank, flags)


def test_all_rules_match_the_loop_on_a_larger_day():
    rng = np.random.default_rng(5)
    table, out = candidates(rng, 400, (20, 60), 600, 12)
    for fallback in ("end", "relax"):
        cfg = ScoringConfig.model_validate({"traffic_cap": {"default_cap": 12}, "list_size": 20,
                                            "window": {"n": 4, "k": 1, "fallback": fallback},
                                            "low_quality": {"action": "filter"}})
        res = score_candidates(table, out, cfg, campaign_items=pa.array([1, 2, 3], pa.int64()))
        assert res.summary["cap_rounds"] > 0 and res.summary["rules"]["capped"] > 0
        rank, flags, _ = score_loop(table, out, cfg, campaign_items={1, 2, 3})
        assert by_key(res.table) == loop_by_key(table, rank, flags)


# ------------------------------------------------------------------------------------------ output

def test_output_is_each_requests_candidates_once_with_explanations():
    rng = np.random.default_rng(9)
    table, out = candidates(rng, 50, (1, 30), 100, 5)
    cfg = ScoringConfig.model_validate({"list_size": 10, "window": {"fallback": "relax"},
                                        "low_quality": {"action": "filter", "threshold": 0.6}})
    res = score_candidates(table, out, cfg)
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
    for name in ("score", "p_ctr", "p_cvr", "stay", "factor_ctr", "factor_cvr", "factor_price", "factor_stay",
                 "factor_cart", "factor_collect", "rule_weight"):
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
    cfg = ScoringConfig.model_validate({"traffic_cap": {"default_cap": 1}})
    d = score_candidates(table, out, cfg).table.to_pydict()
    got = dict(zip(d["request_id"], d["rank"]))
    assert got == {"early": 1, "late": None}
    assert d["request_id"] == ["early", "late"]  # listing follows serving order
