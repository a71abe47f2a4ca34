"""Piecewise-linear numeric encoding: values, fitted quantile edges, merging, spec rules, round trip."""
import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

import mtrank.features
from mtrank.features.featurize import Featurizer
from mtrank.features.numeric import NumericStats, QuantileSketch, piecewise_linear_exprs
from mtrank.features.spec import SpecError, parse_spec
from mtrank.models import ModelConfig
from mtrank.models.embedding import FusedEmbeddings

START = dt.date(2026, 11, 1)


def _raw(**changes) -> dict:
    """The default spec with some numeric features replaced (name -> extra keys, or None to keep)."""
    raw = yaml.safe_load((Path(mtrank.features.__file__).parent / "default_spec.yaml").read_text())
    for f in raw["features"]:
        if f["name"] in changes:
            f.update(changes[f["name"]])
    return raw


def _ple_spec(bins=4, keep_value=False, **extra):
    keys = {"encoding": "piecewise_linear", "bins": bins, "keep_value": keep_value, **extra}
    if not keep_value:
        keys["standardize"] = False
    return parse_spec(_raw(item_ctr_7d=keys))


def _encode(x, edges, bins):
    df = pl.DataFrame({"x": pl.Series(x, dtype=pl.Float64)})
    return df.select([e.alias(str(i)) for i, e in enumerate(piecewise_linear_exprs(pl.col("x"), np.asarray(edges,
                                                                                                float), bins))])


def test_encoding_hand_computed():
    # edges 0, 1, 3, 7: bin widths 1, 2, 4; first bin open below, last open above
    out = _encode([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 11.0, None], [0, 1, 3, 7], 3).to_numpy()
    expected = [[-1, 0, 0], [0, 0, 0], [0.5, 0, 0], [1, 0, 0], [1, 0.5, 0], [1, 1, 0], [1, 1, 0.5], [1, 1, 1],
                [1, 1, 2], [np.nan] * 3]
    np.testing.assert_allclose(out, np.array(expected, float))


def test_encoding_fewer_edges_pads_with_zeros_and_single_bin_is_linear():
    out = _encode([0.0, 2.0, 4.0, 6.0], [2, 4], 3).to_numpy()     # one fitted bin of 3: unclamped, then zeros
    np.testing.assert_allclose(out, [[-1, 0, 0], [0, 0, 0], [1, 0, 0], [2, 0, 0]])


def test_edges_are_tie_aware_quantiles():
    # 10 distinct values, equal mass: 5 bins -> every other value
    assert QuantileSketch.of_values(np.arange(10.0)).edges(5).tolist() == [0, 2, 4, 6, 8, 9]
    # a point mass at the minimum (zero-inflated, like capital-gain) is b0; the bins split the rest
    x = np.concatenate([np.zeros(900), np.arange(1.0, 101.0)])
    assert QuantileSketch.of_values(x).edges(4).tolist() == [0, 25, 50, 75, 100]
    # a heavy value in the middle becomes an edge of its own
    x = np.concatenate([np.arange(0.0, 50.0), np.full(500, 40.0), np.arange(50.0, 100.0)])
    e = QuantileSketch.of_values(x).edges(4)
    assert 40.0 in e and len(e) == 5 and np.all(np.diff(e) > 0)
    # few distinct values: each is an edge
    assert QuantileSketch.of_values(np.array([3.0, 1.0, 1.0, 2.0])).edges(8).tolist() == [1, 2, 3]
    # the edges are quantiles: each bin holds about 1/bins of the mass
    x = np.random.default_rng(0).lognormal(size=20_000)
    e = QuantileSketch.of_values(x).edges(8)
    share = np.histogram(x, bins=e)[0] / x.size
    assert np.allclose(share, 1 / 8, atol=0.002)


def test_nulls_are_filled_before_encoding():
    spec = _ple_spec(bins=4, fill=0.5)
    f = spec.feature_by_name["item_ctr_7d"]
    from tests.conftest import make_frame

    df = make_frame(spec, 200).with_columns(item_ctr_7d=pl.Series([None, *np.linspace(0, 1, 199)], dtype=pl.Float64))
    stats = NumericStats.of_frame(df, spec)
    edges = stats.edges(f)
    assert stats.sketches["item_ctr_7d"].count == 200      # the null counted as its fill
    fz = Featurizer(spec, stats)
    arr = fz.transform(df)
    cols = slice(spec.dense.index(f), spec.dense.index(f) + 4)   # the other dense features are 1 column each
    row0 = arr.dense[0, cols]
    ref = _encode([0.5], edges, 4).to_numpy()[0]
    np.testing.assert_allclose(row0, ref, atol=1e-6)
    assert arr.dense.shape == (200, len(spec.dense) - 1 + 4)


def test_merge_across_chunks_equals_fit_on_the_whole():
    rng = np.random.default_rng(1)
    x = np.round(rng.gamma(2.0, 3.0, 3000), 1)           # ~350 distinct values: the sketch stays exact
    whole = QuantileSketch.of_values(x)
    parts = [QuantileSketch.of_values(p) for p in np.array_split(x, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert np.array_equal(merged.values, whole.values) and np.array_equal(merged.counts, whole.counts)
    assert np.array_equal(merged.edges(16), whole.edges(16))
    # through NumericStats, as fit_numeric_stats and the DDP ranks merge
    spec = _ple_spec(bins=16)
    from tests.conftest import make_frame

    df = make_frame(spec, 3000).with_columns(item_ctr_7d=pl.Series(x / x.max()))
    chunks = NumericStats()
    for lo in range(0, 3000, 700):
        chunks = chunks.merge(NumericStats.of_frame(df.slice(lo, 700), spec))
    f = spec.feature_by_name["item_ctr_7d"]
    assert np.array_equal(chunks.edges(f), NumericStats.of_frame(df, spec).edges(f))


def test_compressed_sketch_stays_close_and_keeps_heavy_values():
    rng = np.random.default_rng(2)
    x = np.concatenate([np.zeros(50_000), rng.normal(size=50_000)])   # 50k distinct values + a point mass
    merged = QuantileSketch()
    for p in np.array_split(x, 10):
        merged = merged.merge(QuantileSketch.of_values(p))
    assert merged.values.size <= 3 * 2048 and merged.count == x.size
    assert 0.0 in merged.values and merged.counts[merged.values == 0.0][0] >= 50_000
    v, c = np.unique(x, return_counts=True)
    exact = QuantileSketch(v, c.astype(float)).edges(8)        # the uncompressed histogram's edges
    approx = merged.edges(8)
    assert 0.0 in approx and 0.0 in exact
    cdf = lambda e: np.searchsorted(np.sort(x), e, side="right") / x.size  # noqa: E731
    assert np.all(np.abs(cdf(approx) - cdf(exact)) < 0.005)


@pytest.mark.parametrize("keys, message", [
    ({"encoding": "piecewise_linear", "bins": 1, "standardize": False}, "bins >= 2"),
    ({"encoding": "piecewise_linear", "standardize": False}, "bins >= 2"),
    ({"encoding": "piecewise_linear", "bins": 8, "standardize": False, "boundaries": [1, 2]}, "boundaries"),
    ({"encoding": "piecewise_linear", "bins": 8}, "keep_value"),
    ({"bins": 8}, "only meaningful"),
    ({"keep_value": True}, "only meaningful"),
    ({"encoding": "quantile", "bins": 8, "standardize": False}, "encoding"),
])
def test_spec_validation(keys, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_raw(item_ctr_7d=keys))


def test_dense_width_follows_encoding():
    spec = _ple_spec(bins=8, keep_value=True, standardize=True)
    f = spec.feature_by_name["item_ctr_7d"]
    assert f.dense_width == 9 and spec.feature_by_name["price"].dense_width == 1
    emb = FusedEmbeddings(spec)
    assert emb.n_dense == len(spec.dense) + 8
    base = FusedEmbeddings(parse_spec(_raw()))
    assert emb.output_dim == base.output_dim + 8


def test_stats_json_round_trip_and_missing():
    spec = _ple_spec(bins=8, keep_value=True, standardize=True)
    from tests.conftest import make_frame

    df = make_frame(spec, 500)
    stats = NumericStats.of_frame(df, spec)
    back = NumericStats.from_json(stats.to_json())
    f = spec.feature_by_name["item_ctr_7d"]
    assert np.array_equal(back.edges(f), stats.edges(f)) and back == stats
    np.testing.assert_array_equal(Featurizer(spec, back).transform(df).dense, Featurizer(spec, stats).transform(df).dense)
    # a spec without piecewise-linear features keeps the moments-only format
    plain = parse_spec(_raw())
    assert "__quantiles__" not in NumericStats.of_frame(df, plain).to_json()
    # moments alone do not featurize a piecewise-linear feature
    with pytest.raises(ValueError, match="item_ctr_7d"):
        Featurizer(spec, NumericStats(stats.moments)).transform(df)


def test_tiny_train_with_a_piecewise_linear_feature(tmp_path):
    from mtrank.jobs.model_io import load_model, save_model
    from mtrank.pipeline.dataset import open_window
    from mtrank.pipeline.evaluate import predict
    from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
    from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions
    from mtrank.pipeline.trainer import TrainConfig, Trainer, build_model

    generate_impressions(tmp_path / "logs", ImpressionConfig(seed=5, start=START, days=2, rows_per_day=3000,
                                                             n_users=200, n_items=100, n_brands=50, n_shops=50,
                                                             n_categories=20), progress=False)
    raw = _raw(item_ctr_7d={"encoding": "piecewise_linear", "bins": 6, "standardize": False},
               price={"encoding": "piecewise_linear", "bins": 4, "keep_value": True})
    for t in raw["tables"].values():
        t["buckets"] = min(t["buckets"], 1024)
    for f in raw["features"]:
        if "buckets" in f:
            f["buckets"] = min(f["buckets"], 1024)
    spec = parse_spec(raw)
    window = open_window(tmp_path / "logs", spec, START, START + dt.timedelta(days=1))
    stats = fit_numeric_stats(ImpressionReader(window, spec, progress=False))
    assert len(stats.edges(spec.feature_by_name["item_ctr_7d"])) == 7
    fz = Featurizer(spec, stats)
    cfg = TrainConfig(epochs=1, batch_size=512, seed=0)
    model = build_model(spec, ModelConfig(experts=2, expert_mlp=(16,), tower_mlp=(8,)), 0, stats)
    assert model.embeddings.n_dense == len(spec.dense) - 2 + 6 + 5
    Trainer(model, spec, cfg).fit(ImpressionReader(window, spec, fz, batch_size=512, progress=False),
                                  progress=False)
    pred = predict(model, ImpressionReader(window, spec, fz, batch_size=512, shuffle=False, progress=False))
    p = next(iter(pred.outputs.values()))
    assert len(p) == 6000 and np.all(np.isfinite(p))
    save_model(tmp_path / "model", model, spec, stats)
    saved = load_model(tmp_path / "model")
    for name in ("item_ctr_7d", "price"):
        f = spec.feature_by_name[name]
        assert np.array_equal(saved.stats.edges(f), stats.edges(f))
    assert saved.model.embeddings.n_dense == model.embeddings.n_dense


def test_init_spec_proposes_piecewise_linear_for_many_distinct_values(tmp_path):
    from mtrank.features.infer_spec import PLE_BINS, PLE_MIN_DISTINCT, InferOptions, infer_spec

    rng = np.random.default_rng(0)
    n = 2000
    part = tmp_path / "logs" / "dt=2026-11-01"
    part.mkdir(parents=True)
    pl.DataFrame({"amount": rng.lognormal(size=n), "rooms": rng.integers(1, 6, n),
                  "label": (rng.random(n) < 0.3).astype(np.int8)}).write_parquet(part / "part-0.parquet")
    spec = parse_spec(yaml.safe_load(infer_spec(tmp_path / "logs", InferOptions(tasks=[("label", "label")])).text))
    amount, rooms = spec.feature_by_name["amount"], spec.feature_by_name["rooms"]
    assert amount.piecewise_linear and amount.bins == PLE_BINS and amount.keep_value and amount.standardize
    assert amount.dense_width == PLE_BINS + 1
    assert not rooms.piecewise_linear and rooms.standardize and rooms.dense_width == 1 and 5 < PLE_MIN_DISTINCT
