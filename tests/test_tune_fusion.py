"""`mtrank tune-fusion`: the pure objectives and search on arrays whose truth is known, then one
end-to-end run against a model trained and registered by `mtrank daily` in a real sqlite store."""
import json
import subprocess
import time

import mlflow
import numpy as np
import pyarrow as pa
import pytest

from jobs.tune_fusion import _capped, item_codes
from pipeline.scoring.config import FusionConfig
from pipeline.scoring.tuning import (RequestMatrix, evaluate, graded_gain, relative_change, search,
                                     split_requests)
from tests.conftest import MTRANK, cli_generate, small_spec, write_job

FLAT = FusionConfig(alpha=0.001, beta=1.0, a=0.0, b=0.0, c=0.0)  # only pCTR, pCVR and price matter


def matrix(rid, p_ctr, p_cvr, price, click=None, conversion=None, cart=None, collect=None, k=10, item_ids=None,
           **more):
    n = len(rid)
    z = np.zeros(n)
    outs = {"p_ctr": np.asarray(p_ctr, float), "p_cvr": np.asarray(p_cvr, float), **more}
    return RequestMatrix.build(np.asarray(rid), outs, np.asarray(price, float),
                               *(z if x is None else np.asarray(x) for x in (click, conversion, cart, collect)), k,
                               item_ids=item_ids)


# -- objectives ------------------------------------------------------------------------------------

def test_gmv_at_k_by_hand():
    # equal pCTR and pCVR: with a, b, c = 0 each request is ranked by price, highest first
    rid = ["A", "A", "A", "B", "B"]
    price = [10, 100, 50, 20, 30]
    conv = [1, 0, 1, 1, 1]
    m = matrix(rid, [0.2] * 5, [0.1] * 5, price, click=conv, conversion=conv, k=2)
    assert m.requests == 2 and m.width == 3
    # A: 100 (no conversion), 50 -> 50;  B: 30, 20 -> 50
    assert evaluate(m, {}, FLAT, k=2).gmv == pytest.approx(50.0)
    # top 1: A -> 0, B -> 30
    assert evaluate(m, {}, FLAT, k=1).gmv == pytest.approx(15.0)
    # a missing or non-positive price counts 0 in GMV (as in the fusion formula)
    m2 = matrix(["A", "A"], [0.2, 0.1], [0.1, 0.1], [np.nan, 5.0], click=[1, 1], conversion=[1, 1], k=1)
    assert evaluate(m2, {}, FLAT, k=1).gmv == pytest.approx(5.0)


def test_graded_gain_takes_the_highest_action():
    g = graded_gain(np.array([0, 1, 1, 1, 1]), np.array([0, 0, 0, 0, 1]), np.array([0, 0, 1, 0, 1]),
                    np.array([0, 0, 0, 1, 0]))
    assert g.tolist() == [0, 1, 2, 2, 3]


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
    from pipeline.scoring.fusion import fuse
    from pipeline.scoring.rerank import rerank

    items = np.array([30, 10, 20, 7, 5])
    rid, conv = ["A", "A", "A", "B", "B"], [1, 0, 0, 1, 0]   # each request's logged-first item converted
    preds = dict(p_ctr=[0.2] * 5, p_cvr=[0.1] * 5, price=[1.0] * 5, click=conv, conversion=conv, k=1)
    assert evaluate(matrix(rid, **preds), {}, FLAT).gmv == pytest.approx(1.0)   # logged order: 30 and 7
    by_item = matrix(rid, **preds, item_ids=items)
    # the scorer on the same rows: its first slot per request
    outs = {"p_ctr": np.asarray(preds["p_ctr"]), "p_cvr": np.asarray(preds["p_cvr"])}
    cols, _ = fuse(outs, np.asarray(preds["price"]), np.ones(5), FLAT)
    _, item_code = np.unique(items, return_inverse=True)
    ranking = rerank(np.array([0, 0, 0, 1, 1]), cols["score"], item_code, eligible=np.ones(5, bool))
    first = {r: items[(ranking.rank == 1) & (np.array(rid) == r)][0] for r in "AB"}
    assert first == {"A": 10, "B": 5}
    gmv_scorer = np.mean([np.asarray(conv)[items == first[r]][0] for r in "AB"])
    assert evaluate(by_item, {}, FLAT).gmv == pytest.approx(gmv_scorer) == pytest.approx(0.0)


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


def test_gmv_steps_at_the_beta_the_construction_predicts():
    rid, p_ctr, p_cvr, price, conv = price_world(50)
    m = matrix(rid, p_ctr, p_cvr, price, click=conv, conversion=conv, k=1)
    gmv = {beta: evaluate(m, {"beta": beta}, FLAT, k=1).gmv for beta in (0.1, 1, 7.0, 7.4, 100, 1000)}
    assert gmv == {0.1: 100.0, 1: 100.0, 7.0: 100.0, 7.4: 0.0, 100: 0.0, 1000: 0.0}


def test_search_improves_a_bad_start_and_reports_the_holdout():
    rid, p_ctr, p_cvr, price, conv = price_world(400, seed=1)
    hold = split_requests(rid)
    assert 0.35 < hold.mean() < 0.65
    halves = {h: matrix(rid[rows], p_ctr[rows], p_cvr[rows], price[rows], click=conv[rows],
                        conversion=conv[rows], k=1) for h, rows in (("tune", ~hold), ("holdout", hold))}
    bad = FLAT.model_copy(update={"beta": 500.0})
    found = search(halves["tune"], bad, k=1, trials=60, objective="gmv", seed=3)
    assert len(found.trials) <= 60 and found.trials[0].phase == "start"
    assert found.trials[0].params["beta"] == 500.0 and found.start.gmv == 0.0
    best = found.best_trial
    assert best.gmv == pytest.approx(100.0) and best.params["beta"] < 7.2
    # the holdout: every request is built alike, so here the improvement holds by construction
    start_h = evaluate(halves["holdout"], found.start.params, bad, k=1)
    best_h = evaluate(halves["holdout"], best.params, bad, k=1)
    assert np.isnan(relative_change(start_h.gmv, best_h.gmv))  # from 0 there is no relative change
    assert best_h.gmv == pytest.approx(100.0) and start_h.gmv == 0.0
    # seeded: the same seed gives the same trials
    again = search(halves["tune"], bad, k=1, trials=60, objective="gmv", seed=3)
    assert [t.params for t in again.trials] == [t.params for t in found.trials]


def test_search_stays_in_the_box_and_holds_exponents_of_missing_outputs():
    rng = np.random.default_rng(0)
    n = 2000
    rid = np.repeat(np.arange(100), 20)
    click = (rng.random(n) < 0.3).astype(np.int8)
    conv = click * (rng.random(n) < 0.3)
    m = matrix(rid, rng.random(n), rng.random(n), rng.gamma(2, 20, n), click=click, conversion=conv,
               k=5, p_cart=rng.random(n), p_collect=rng.random(n))  # no "stay" output
    base = FusionConfig(a=0.0)
    found = search(m, base, k=5, trials=50, objective="ndcg", seed=0)
    assert found.fixed == ["a"]
    for t in found.trials:
        p = t.params
        assert p["a"] == 0.0
        if t.phase != "start":
            assert 1e-3 <= p["alpha"] <= 1 and 0.1 <= p["beta"] <= 1e3 and 0 <= p["b"] <= 2 and 0 <= p["c"] <= 2
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


def test_one_trial_on_50k_rows_is_fast():
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 51, 2000)
    rid = np.repeat(np.arange(len(sizes)), sizes)[:50_000]
    n = len(rid)
    click = (rng.random(n) < 0.1).astype(np.int8)
    m = matrix(rid, rng.random(n), rng.random(n), rng.gamma(2, 20, n), click=click, conversion=click,
               k=10, stay=rng.exponential(30, n), p_cart=rng.random(n), p_collect=rng.random(n))
    base = FusionConfig()
    evaluate(m, {}, base)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        evaluate(m, {"beta": 3.0}, base)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.1, times  # typically ~10 ms on 2 cores


def test_max_rows_keeps_whole_requests():
    rid = ["a"] * 3 + ["b"] * 4 + ["c"] * 3
    frames = iter([pa.record_batch({"request_id": rid[:5], "x": list(range(5))}),
                   pa.record_batch({"request_id": rid[5:], "x": list(range(5, 10))})])
    out = pa.Table.from_batches(list(_capped(frames, 5, "request_id")))
    assert out["request_id"].to_pylist() == ["a"] * 3  # "b" would be cut: left out whole
    frames = iter([pa.record_batch({"request_id": rid, "x": list(range(10))})])
    assert pa.Table.from_batches(list(_capped(frames, 7, "request_id"))).num_rows == 7  # a cut on a boundary
    frames = iter([pa.record_batch({"request_id": ["a"] * 10, "x": list(range(10))})])
    assert pa.Table.from_batches(list(_capped(frames, 4, "request_id"))).num_rows == 4  # one big request: cut


def test_reader_keeps_extra_columns_and_names_a_missing_one(tmp_path, spec):
    import datetime as dt

    from features.rules import BadInputError
    from pipeline.dataset import open_window
    from pipeline.reader import ImpressionReader
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
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("tune")
    cli_generate(base / "logs", days=4, rows=20_000, seed=5, users=2000, items=800)
    small_spec(base / "spec.yaml")
    write_job(base / "job.yaml", "ranker", {"batch_size": 1024, "epochs": 1, "lr": 0.003},
              model={"experts": 2, "expert_mlp": [16], "tower_mlp": [8]})
    r = subprocess.run([*MTRANK, "daily", "--config", base / "job.yaml", "--date", "2026-11-03"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return base


def test_tune_fusion_end_to_end(trained, tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([*MTRANK, "tune-fusion", "--model", "models:/ranker@champion", "--config",
                        trained / "job.yaml", "--data", trained / "logs", "--date", "2026-11-04",
                        "--trials", "40", "--json", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "holdout" in r.stdout and "GMV@10" in r.stdout and "NDCG@10" in r.stdout
    res = json.loads(out.read_text())
    start = FusionConfig()
    assert res["start"]["params"] == {k: getattr(start, k) for k in ("alpha", "beta", "a", "b", "c")}
    for which in ("start", "best"):
        for half in ("tune", "holdout"):
            assert set(res[which][half]) == {"gmv", "ndcg"}
            assert res[which][half]["gmv"] > 0 and 0 < res[which][half]["ndcg"] <= 1
    assert res["best"]["tune"]["gmv"] >= res["start"]["tune"]["gmv"]
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
    assert float(run.data.params["best.beta"]) == res["best"]["params"]["beta"]
    assert run.data.metrics["best.holdout.gmv"] == pytest.approx(res["best"]["holdout"]["gmv"])
    assert run.data.metrics["start.tune.ndcg"] == pytest.approx(res["start"]["tune"]["ndcg"])
