"""`mtrank tune-fusion`: the pure objectives and search on arrays whose truth is known, then one
end-to-end run against a model trained and registered by `mtrank daily` in a real sqlite store."""
import json

import mlflow
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from mtrank.features.spec import load_spec
from mtrank.jobs.config import load_config
from mtrank.jobs.tune_fusion import _capped, item_codes
from mtrank.pipeline.scoring.config import Factor, FusionConfig, TuneConfig
from mtrank.pipeline.scoring.fusion import resolve
from mtrank.pipeline.scoring.tuning import (RequestMatrix, check_tune, default_gains, evaluate, graded_gain,
                                     relative_change, search, split_requests)
from tests.conftest import mtrank_in_process, other_names_spec

SCHEMA = load_spec().outputs
DEMO = load_config().score            # the demo job: six factors and score.tune
DEMO_PLAN = resolve(DEMO.fusion, SCHEMA)
GAINS = dict(DEMO.tune.gains)         # click 1, cart or collect 2, conversion 3
# only pCTR, pCVR and price matter: alpha = 0.001 (p_cvr.offset), beta = 1 (price.offset), a = b = c = 0
FLAT_CFG = FusionConfig(factors=[
    {"output": "p_ctr"},
    {"output": "p_cvr", "offset": 0.001, "search": {"offset": {"lo": 0.001, "hi": 1.0}}},
    {"column": "price", "offset": 1.0, "search": {"offset": {"lo": 0.1, "hi": 1000.0}}},
])
FLAT = resolve(FLAT_CFG, SCHEMA)


def matrix(rid, p_ctr, p_cvr, price, click=None, conversion=None, cart=None, collect=None, k=10, item_ids=None,
           **more):
    """Logged rows of the default spec: value = price where converted, gains GAINS over the labels."""
    n = len(rid)
    z = np.zeros(n)
    outs = {"p_ctr": np.asarray(p_ctr, float), "p_cvr": np.asarray(p_cvr, float), **more}
    labels = {t: z if x is None else np.asarray(x)
              for t, x in (("ctr", click), ("cvr", conversion), ("cart", cart), ("collect", collect))}
    price = np.asarray(price, float)
    return RequestMatrix.build(np.asarray(rid), outs, {"price": price}, price * (labels["cvr"] > 0),
                               graded_gain(labels, GAINS), k, item_ids=item_ids)


# -- objectives ------------------------------------------------------------------------------------

def test_demo_factors_are_the_old_defaults_and_search_box():
    """The demo job states the mission formula; its search box is the former alpha/beta/a/b/c box."""
    assert DEMO_PLAN.params() == {
        "p_ctr.offset": 0.0, "p_ctr.exponent": 1.0, "p_cvr.offset": 0.05, "p_cvr.exponent": 1.0,
        "price.offset": 1.0, "price.exponent": 1.0, "stay.offset": 0.0, "stay.exponent": 0.2,
        "p_cart.offset": 0.0, "p_cart.exponent": 0.2, "p_collect.offset": 0.0, "p_collect.exponent": 0.1}
    assert DEMO_PLAN.bounds() == {"p_cvr.offset": (1e-3, 1.0, True), "price.offset": (0.1, 1e3, True),
                                  "stay.exponent": (0.0, 2.0, False), "p_cart.exponent": (0.0, 2.0, False),
                                  "p_collect.exponent": (0.0, 2.0, False)}
    assert (DEMO.tune.value_column, DEMO.tune.value_task) == ("price", "cvr")
    assert check_tune(DEMO.tune, SCHEMA) == {"ctr": 1, "cart": 2, "collect": 2, "cvr": 3}


def test_value_at_k_by_hand():
    # equal pCTR and pCVR: with a, b, c = 0 each request is ranked by price, highest first
    rid = ["A", "A", "A", "B", "B"]
    price = [10, 100, 50, 20, 30]
    conv = [1, 0, 1, 1, 1]
    m = matrix(rid, [0.2] * 5, [0.1] * 5, price, click=conv, conversion=conv, k=2)
    assert m.requests == 2 and m.width == 3
    # A: 100 (no conversion), 50 -> 50;  B: 30, 20 -> 50
    assert evaluate(m, {}, FLAT, k=2).value == pytest.approx(50.0)
    # top 1: A -> 0, B -> 30
    assert evaluate(m, {}, FLAT, k=1).value == pytest.approx(15.0)
    # a missing or non-positive price counts 0 in the value (as in the fusion formula)
    m2 = matrix(["A", "A"], [0.2, 0.1], [0.1, 0.1], [np.nan, 5.0], click=[1, 1], conversion=[1, 1], k=1)
    assert evaluate(m2, {}, FLAT, k=1).value == pytest.approx(5.0)
    # without a value objective configured the value is NaN, and searching it is refused
    assert np.isnan(evaluate(m, {}, FLAT, k=2, has_value=False).value)
    assert evaluate(m, {}, FLAT, k=2, has_value=False).ndcg == evaluate(m, {}, FLAT, k=2).ndcg
    with pytest.raises(ValueError, match="value_column"):
        search(m, FLAT, k=2, trials=3, objective="value", has_value=False)
    with pytest.raises(ValueError, match="objective"):
        search(m, FLAT, k=2, trials=3, objective="gmv")


def test_a_filtered_bad_value_never_ranks():
    """on_bad_value filter in the tuner as in the scorer: the row is out of the ranking."""
    filt = resolve(FLAT_CFG.model_copy(update={"factors": tuple(
        f.model_copy(update={"on_bad_value": "filter"}) if f.column == "price" else f for f in FLAT_CFG.factors)}),
        SCHEMA)
    # the unpriced row has by far the best pCTR: "zero" ranks it first, "filter" drops it
    m = matrix(["A", "A", "A"], [0.9, 0.1, 0.1], [0.1] * 3, [np.nan, 5.0, 3.0], click=[1, 1, 0],
               conversion=[0, 1, 0], k=1)
    assert evaluate(m, {}, FLAT, k=1).value == 0.0
    assert evaluate(m, {}, filt, k=1).value == pytest.approx(5.0)


def test_graded_gain_takes_the_highest_action():
    labels = {"ctr": np.array([0, 1, 1, 1, 1]), "cvr": np.array([0, 0, 0, 0, 1]),
              "cart": np.array([0, 0, 1, 0, 1]), "collect": np.array([0, 0, 0, 1, 0])}
    assert graded_gain(labels, GAINS).tolist() == [0, 1, 2, 2, 3]
    # the default gains: 1 for a task on all rows, 2 for the others
    assert default_gains(SCHEMA) == {"ctr": 1.0, "cvr": 2.0, "collect": 2.0, "cart": 2.0}
    assert graded_gain(labels, default_gains(SCHEMA)).tolist() == [0, 1, 2, 2, 2]


def test_ndcg_ideal_reversed_and_hand_value():
    click = [1, 1, 1, 0]
    conv = [1, 0, 0, 0]
    cart = [0, 1, 0, 0]  # gains 3, 2, 1, 0
    ideal = matrix(["r"] * 4, [0.9, 0.7, 0.5, 0.3], [0.5] * 4, [1] * 4, click, conv, cart)
    assert evaluate(ideal, {}, FLAT).ndcg == pytest.approx(1.0)
    rev = matrix(["r"] * 4, [0.3, 0.5, 0.7, 0.9], [0.5] * 4, [1] * 4, click, conv, cart)
    assert evaluate(rev, {}, FLAT).ndcg < 1.0
    # gains [0, 3] ranked as is: DCG = 3 / log2(3), ideal DCG = 3
    two = matrix(["q", "q"], [0.9, 0.1], [0.5, 0.5], [1, 1], click=[0, 1], conversion=[0, 1])
    assert evaluate(two, {}, FLAT).ndcg == pytest.approx(1 / np.log2(3))
    # a request without any positive is left out of the mean, and counted
    more = matrix(["q", "q", "z", "z"], [0.9, 0.1, 0.5, 0.4], [0.5] * 4, [1] * 4, click=[0, 1, 0, 0],
                  conversion=[0, 1, 0, 0])
    assert evaluate(more, {}, FLAT).ndcg == pytest.approx(1 / np.log2(3))
    assert more.describe()["ndcg_excluded_requests"] == 1 and more.describe()["ndcg_requests"] == 1


def test_rows_of_a_request_need_not_be_contiguous():
    a = matrix(["A", "B", "A", "B"], [0.5, 0.2, 0.1, 0.3], [0.1] * 4, [1, 1, 1, 1],
               click=[0, 0, 1, 1], conversion=[0, 0, 1, 1], k=1)
    b = matrix(["A", "A", "B", "B"], [0.5, 0.1, 0.2, 0.3], [0.1] * 4, [1, 1, 1, 1],
               click=[0, 1, 0, 1], conversion=[0, 1, 0, 1], k=1)
    assert evaluate(a, {}, FLAT) == evaluate(b, {}, FLAT)


def test_equal_fused_scores_rank_as_the_scorer_ranks_them():
    """Ties (here: equal predictions and price) go to the smaller item id, as in `rerank`, not to
    whichever row was logged first."""
    from mtrank.pipeline.scoring.fusion import fuse
    from mtrank.pipeline.scoring.rerank import rerank

    items = np.array([30, 10, 20, 7, 5])
    rid, conv = ["A", "A", "A", "B", "B"], [1, 0, 0, 1, 0]   # each request's logged-first item converted
    preds = dict(p_ctr=[0.2] * 5, p_cvr=[0.1] * 5, price=[1.0] * 5, click=conv, conversion=conv, k=1)
    assert evaluate(matrix(rid, **preds), {}, FLAT).value == pytest.approx(1.0)   # logged order: 30 and 7
    by_item = matrix(rid, **preds, item_ids=items)
    # the scorer on the same rows: its first slot per request
    outs = {"p_ctr": np.asarray(preds["p_ctr"]), "p_cvr": np.asarray(preds["p_cvr"])}
    cols, _, _ = fuse(outs, {"price": np.asarray(preds["price"])}, np.ones(5), FLAT)
    _, item_code = np.unique(items, return_inverse=True)
    ranking = rerank(np.array([0, 0, 0, 1, 1]), cols["score"], item_code, eligible=np.ones(5, bool))
    first = {r: items[(ranking.rank == 1) & (np.array(rid) == r)][0] for r in "AB"}
    assert first == {"A": 10, "B": 5}
    value_scorer = np.mean([np.asarray(conv)[items == first[r]][0] for r in "AB"])
    assert evaluate(by_item, {}, FLAT).value == pytest.approx(value_scorer) == pytest.approx(0.0)


@pytest.mark.parametrize("ids", [["b", None, "a", "c", "a"], [20, None, 3, 100, 3]])
def test_item_codes_follow_the_ids_with_a_missing_id_last(ids):
    codes = item_codes(pa.chunked_array([pa.array(ids[:2]), pa.array(ids[2:])]))
    assert codes.tolist() == [1, 3, 0, 2, 0]

# -- a price weight that is clearly best ------------------------------------------------------------

def price_world(n_requests: int, seed: int = 0):
    """Every request: H (price 100, pCTR 0.2, pCVR 0.2) always converts, L (price 10, pCTR 0.5,
    pCVR 0.5) never does, plus 2 filler rows that never rank first. With alpha = 0.001 and a, b, c = 0,
    H outranks L iff 0.0402 (beta + 100) > 0.2505 (beta + 10), i.e. beta < 7.2: small beta is best."""
    rng = np.random.default_rng(seed)
    rid = np.repeat([f"req{i:05d}" for i in range(n_requests)], 4)
    p_ctr = np.tile([0.2, 0.5, 0.01, 0.01], n_requests)
    p_cvr = np.tile([0.2, 0.5, 0.01, 0.01], n_requests)
    price = np.tile([100.0, 10.0, 1.0, 1.0], n_requests)
    conv = np.tile([1, 0, 0, 0], n_requests)
    perm = rng.permutation(len(rid))  # logged order shuffled
    return rid[perm], p_ctr[perm], p_cvr[perm], price[perm], conv[perm]


def test_value_steps_at_the_beta_the_construction_predicts():
    rid, p_ctr, p_cvr, price, conv = price_world(50)
    m = matrix(rid, p_ctr, p_cvr, price, click=conv, conversion=conv, k=1)
    value = {beta: evaluate(m, {"price.offset": beta}, FLAT, k=1).value for beta in (0.1, 1, 7.0, 7.4, 100, 1000)}
    assert value == {0.1: 100.0, 1: 100.0, 7.0: 100.0, 7.4: 0.0, 100: 0.0, 1000: 0.0}


def test_search_improves_a_bad_start_and_reports_the_holdout():
    rid, p_ctr, p_cvr, price, conv = price_world(400, seed=1)
    hold = split_requests(rid)
    assert 0.35 < hold.mean() < 0.65
    halves = {h: matrix(rid[rows], p_ctr[rows], p_cvr[rows], price[rows], click=conv[rows],
                        conversion=conv[rows], k=1) for h, rows in (("tune", ~hold), ("holdout", hold))}
    bad = FLAT.with_params({"price.offset": 500.0})
    found = search(halves["tune"], bad, k=1, trials=60, objective="value", seed=3)
    assert len(found.trials) <= 60 and found.trials[0].phase == "start"
    assert found.trials[0].params["price.offset"] == 500.0 and found.start.value == 0.0
    assert set(found.fixed) == set(bad.params()) - {"p_cvr.offset", "price.offset"}
    best = found.best_trial
    assert best.value == pytest.approx(100.0) and best.params["price.offset"] < 7.2
    assert "(500 + price)" in bad.formula() and "(500 + price)" not in bad.with_params(best.params).formula()
    # the holdout: every request is built alike, so here the improvement holds by construction
    start_h = evaluate(halves["holdout"], found.start.params, bad, k=1)
    best_h = evaluate(halves["holdout"], best.params, bad, k=1)
    assert np.isnan(relative_change(start_h.value, best_h.value))  # from 0 there is no relative change
    assert best_h.value == pytest.approx(100.0) and start_h.value == 0.0
    # seeded: the same seed gives the same trials
    again = search(halves["tune"], bad, k=1, trials=60, objective="value", seed=3)
    assert [t.params for t in again.trials] == [t.params for t in found.trials]


def test_search_stays_in_the_box_and_holds_unsearched_parameters():
    rng = np.random.default_rng(0)
    n = 2000
    rid = np.repeat(np.arange(100), 20)
    click = (rng.random(n) < 0.3).astype(np.int8)
    conv = click * (rng.random(n) < 0.3)
    outs = dict(p_cart=rng.random(n), p_collect=rng.random(n))
    m = matrix(rid, rng.random(n), rng.random(n), rng.gamma(2, 20, n), click=click, conversion=conv, k=5,
               **outs)  # no "stay" output
    # the demo formula with the stay factor switched off and not searched: it never needs the output
    base = resolve(DEMO.fusion.model_copy(update={"factors": tuple(
        Factor(output="stay", exponent=0.0) if f.output == "stay" else f for f in DEMO.fusion.factors)}), SCHEMA)
    assert "stay" not in base.required_outputs()
    bounds = base.bounds()
    assert set(bounds) == {"p_cvr.offset", "price.offset", "p_cart.exponent", "p_collect.exponent"}
    found = search(m, base, k=5, trials=50, objective="ndcg", seed=0)
    assert "stay.exponent" in found.fixed and set(found.fixed) == set(base.params()) - set(bounds)
    for t in found.trials:
        p = t.params
        assert p["stay.exponent"] == 0.0
        assert all(p[q] == v for q, v in base.params().items() if q not in bounds)
        if t.phase != "start":
            assert 1e-3 <= p["p_cvr.offset"] <= 1 and 0.1 <= p["price.offset"] <= 1e3
            assert 0 <= p["p_cart.exponent"] <= 2 and 0 <= p["p_collect.exponent"] <= 2
    assert found.best_trial.ndcg >= found.start.ndcg
    assert {t.phase for t in found.trials} == {"start", "random", "refine"}


def test_split_is_stable_and_keeps_requests_together():
    ids = np.array(["r20261104-000000001", "r20261104-000000002", "r20261104-000000001", "x"], dtype=object)
    s = split_requests(ids)
    assert s[0] == s[2]
    assert split_requests(ids).tolist() == s.tolist()
    # xxhash64 of the text, never Python's hash(): integers hash like their decimal text
    assert split_requests(np.array([12345, 7])).tolist() == split_requests(np.array(["12345", "7"])).tolist()
    big = split_requests(np.array([f"r{i}" for i in range(10_000)]))
    assert 0.47 < big.mean() < 0.53


# -- a spec whose tasks are named otherwise ----------------------------------------------------------

OTHER = other_names_spec()


def test_tune_config_is_checked_against_the_models_tasks():
    schema = OTHER.outputs
    assert check_tune(TuneConfig(), schema) == {"click_through": 1.0, "purchase": 2.0}
    tc = TuneConfig(gains={"click_through": 1, "purchase": 5}, value_column="amount", value_task="purchase")
    assert check_tune(tc, schema) == {"click_through": 1, "purchase": 5}
    with pytest.raises(ValueError) as e:   # the demo's names do not fit this model
        check_tune(DEMO.tune, schema)
    assert "score.tune.gains" in str(e.value) and "'ctr'" in str(e.value)
    assert "binary tasks are: click_through, purchase" in str(e.value)
    for bad in (TuneConfig(gains={"click_through": 1, "watch_time": 2}),        # a regression task
                TuneConfig(value_column="amount", value_task="cvr")):          # unknown value task
        with pytest.raises(ValueError, match="not a binary task of the model.*click_through, purchase"):
            check_tune(bad, schema)
    with pytest.raises(ValidationError, match="go together"):
        TuneConfig(value_column="amount")
    with pytest.raises(ValidationError, match="gains.purchase must be > 0"):
        TuneConfig(gains={"purchase": 0})


def test_tuning_with_custom_gains_over_other_task_names():
    gains = check_tune(TuneConfig(gains={"click_through": 1, "purchase": 5}, value_column="amount",
                                  value_task="purchase"), OTHER.outputs)
    labels = {"click_through": np.array([1, 1, 0, 1]), "purchase": np.array([1, 0, 0, 0])}
    g = graded_gain(labels, gains)
    assert g.tolist() == [5, 1, 0, 1]
    plan = resolve(FusionConfig(factors=[
        {"output": "p_click_through"},
        {"output": "p_purchase", "offset": 0.01, "search": {"offset": {"lo": 0.001, "hi": 1.0}}},
        {"column": "amount", "offset": 1.0, "search": {"offset": {"lo": 0.1, "hi": 1000.0}}},
        {"output": "watch_time", "exponent": 0.0, "search": {"exponent": {"lo": 0.0, "hi": 2.0}}}]), OTHER.outputs)
    amount = np.array([10.0, 40.0, 5.0, 20.0])
    outs = {"p_click_through": np.array([0.5, 0.6, 0.9, 0.2]), "p_purchase": np.array([0.1, 0.1, 0.1, 0.1]),
            "watch_time": np.array([10.0, 20.0, 30.0, 40.0])}
    m = RequestMatrix.build(np.array(["r"] * 4), outs, {"amount": amount}, amount * labels["purchase"], g, k=4)
    # scores 0.5·0.11·11, 0.6·0.11·41, 0.9·0.11·6, 0.2·0.11·21: order rows 1, 0, 2, 3 -> gains 1, 5, 0, 1
    dcg = 1 + 5 / np.log2(3) + 1 / np.log2(5)
    ideal = 5 + 1 / np.log2(3) + 1 / np.log2(4)
    got = evaluate(m, {}, plan, k=4)
    assert got.ndcg == pytest.approx(dcg / ideal) and got.value == pytest.approx(10.0)
    # NDCG@1: a small amount offset puts row 1 (amount 40, clicked: gain 1 of the ideal 5) first; a
    # large one leaves p_click_through · p_purchase, so row 2 (never clicked: gain 0) comes first
    m1 = RequestMatrix.build(np.array(["r"] * 4), outs, {"amount": amount}, amount * labels["purchase"], g, k=1)
    assert evaluate(m1, {"amount.offset": 0.1}, plan).ndcg == pytest.approx(0.2)
    assert evaluate(m1, {"amount.offset": 1000.0}, plan).ndcg == 0.0
    found = search(m, plan, k=2, trials=30, objective="ndcg", seed=1)
    assert set(found.trials[0].params) == set(plan.params())
    assert found.best_trial.ndcg >= found.start.ndcg
    assert all(0 <= t.params["watch_time.exponent"] <= 2 for t in found.trials)


def test_max_rows_keeps_whole_requests():
    rid = ["a"] * 3 + ["b"] * 4 + ["c"] * 3
    frames = iter([pa.record_batch({"request_id": rid[:5], "x": list(range(5))}),
                   pa.record_batch({"request_id": rid[5:], "x": list(range(5, 10))})])
    out = pa.Table.from_batches(list(_capped(frames, 5, "request_id", "logs")))
    assert out["request_id"].to_pylist() == ["a"] * 3  # "b" would be cut: left out whole
    frames = iter([pa.record_batch({"request_id": rid, "x": list(range(10))})])
    assert pa.Table.from_batches(list(_capped(frames, 7, "request_id", "logs"))).num_rows == 7  # a cut on a boundary
    frames = iter([pa.record_batch({"request_id": ["a"] * 10, "x": list(range(10))})])
    assert pa.Table.from_batches(list(_capped(frames, 4, "request_id", "logs"))).num_rows == 4  # one big request: cut


def test_reader_keeps_extra_columns_and_names_a_missing_one(tmp_path, spec):
    import datetime as dt

    from mtrank.features.rules import BadInputError
    from mtrank.pipeline.dataset import open_window
    from mtrank.pipeline.reader import ImpressionReader
    from tests.conftest import make_frame

    part = tmp_path / "logs" / "dt=2026-11-01"
    part.mkdir(parents=True)
    make_frame(spec, 40).write_parquet(part / "part-0.parquet")
    window = open_window(tmp_path / "logs", spec, dt.date(2026, 11, 1), dt.date(2026, 11, 1))
    rb = next(ImpressionReader(window, spec, progress=False, extra_columns=["request_id", "price"]).frames())
    assert "request_id" in rb.schema.names and rb.num_rows == 40
    with pytest.raises(BadInputError, match="no_such_column"):
        next(ImpressionReader(window, spec, progress=False, extra_columns=["no_such_column"]).frames())


# -- end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(ranker):
    """The shared trained ranker: its job carries the demo's formula and objective."""
    return ranker


@pytest.mark.slow
def test_tune_fusion_end_to_end(trained, tmp_path):
    out = tmp_path / "out.json"
    r = mtrank_in_process("tune-fusion", "--model", "models:/ranker@champion", "--config",
                          trained / "job.yaml", "--data", trained / "logs", "--date", "2026-11-04",
                          "--trials", "40", "--json", out)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "holdout" in r.stdout and "value@10" in r.stdout and "NDCG@10" in r.stdout
    res = json.loads(out.read_text())
    assert res["objective"] == "value"   # score.tune names a value column
    assert res["start"]["params"] == DEMO_PLAN.params()
    assert res["formula"]["start"] == DEMO_PLAN.formula()
    assert res["search_bounds"] == {p: list(b) for p, b in DEMO_PLAN.bounds().items()}
    assert set(res["fixed_params"]) == set(DEMO_PLAN.params()) - set(DEMO_PLAN.bounds())
    for which in ("start", "best"):
        for half in ("tune", "holdout"):
            assert set(res[which][half]) == {"value", "ndcg"}
            assert res[which][half]["value"] > 0 and 0 < res[which][half]["ndcg"] <= 1
    assert res["best"]["tune"]["value"] >= res["start"]["tune"]["value"]
    assert res["formula"]["best"] == DEMO_PLAN.with_params(res["best"]["params"]).formula()
    assert len(res["trial_log"]) == res["trials"] <= 40
    sp = res["split"]
    assert sp["tune"]["rows"] + sp["holdout"]["rows"] == res["rows"]["rows_used"] == 20_000
    assert sp["tune"]["requests"] > 100 and sp["holdout"]["requests"] > 100

    uri = f"sqlite:///{(trained / 'work' / 'mlflow.db').resolve()}"
    c = mlflow.MlflowClient(uri, uri)
    exp = c.get_experiment_by_name("ranker")
    runs = c.search_runs([exp.experiment_id], "tags.`mtrank.job` = 'tune-fusion'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tune-fusion-2026-11-04"
    assert run.data.tags["mtrank.date"] == "2026-11-04"
    assert run.data.tags["mtrank.model_uri"] == "models:/ranker@champion"
    assert float(run.data.params["best.price.offset"]) == res["best"]["params"]["price.offset"]
    assert run.data.metrics["best.holdout.value"] == pytest.approx(res["best"]["holdout"]["value"])
    assert run.data.metrics["start.tune.ndcg"] == pytest.approx(res["start"]["tune"]["ndcg"])


@pytest.mark.slow
def test_a_searched_factor_that_starts_switched_off(trained):
    import datetime as dt

    from mtrank.jobs.config import load_config as load_job
    from mtrank.jobs.tune_fusion import tune_fusion

    cfg = load_job(trained / "job.yaml")
    factors = tuple(f.model_copy(update={"exponent": 0.0}) if f.output == "stay" else f
                    for f in cfg.score.fusion.factors)
    cfg = cfg.model_copy(update={"score": cfg.score.model_copy(update={
        "fusion": cfg.score.fusion.model_copy(update={"factors": factors})})})
    res = tune_fusion(cfg, "models:/ranker@champion", trained / "logs", dt.date(2026, 11, 4), trials=8,
                      max_rows=4000, track=False).result
    assert any(t["params"]["stay.exponent"] > 0 for t in res["trial_log"])
