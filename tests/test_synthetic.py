"""Synthetic data generators: the impression-log contract (schema, layout, determinism, labels,
signal) and the MMoE paper's regression tasks. Real Parquet files in tmp_path, small universes."""
from __future__ import annotations

import dataclasses
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from mtrank.pipeline.synthetic import SCHEMA, ImpressionConfig, generate_impressions, mmoe_synthetic

SMALL = ImpressionConfig(seed=3, start=date(2026, 11, 1), days=2, rows_per_day=25_000, n_users=20_000,
                         n_items=10_000, n_categories=500, n_brands=2_000, n_shops=3_000,
                         rows_per_file=10_000, row_group_size=4_096)

EXPECTED_TYPES = {
    **{c: pa.string() for c in (
        "request_id", "user_gender", "user_age_bucket", "user_level", "user_segment", "user_province",
        "item_type", "seller_level", "item_origin", "item_style", "item_price_band", "device", "os_version",
        "app_version", "network", "city", "hour_of_day", "day_of_week", "scene", "query_topic", "ad_source")},
    "ts": pa.timestamp("us"), "position": pa.int16(),
    **{c: pa.int64() for c in ("user_id", "item_id", "category_id", "brand_id", "shop_id")},
    "user_recent_categories": pa.list_(pa.string()), "item_tags": pa.list_(pa.string()),
    **{c: pa.float64() for c in (
        "price", "item_age_days", "item_ctr_7d", "user_orders_30d", "user_clicks_30d", "item_sales_30d",
        "shop_rating", "discount_rate", "true_p_click", "true_p_conversion", "true_p_collect", "true_p_cart",
        "true_stay_seconds")},
    **{c: pa.int8() for c in ("click", "conversion", "collect", "cart")},
    "stay_seconds": pa.float32(),
}
ORDER = ["request_id", "ts", "user_id", "user_gender", "user_age_bucket", "user_level", "user_segment",
         "user_province", "item_id", "category_id", "brand_id", "shop_id", "item_type", "seller_level",
         "item_origin", "item_style", "item_price_band", "device", "os_version", "app_version", "network",
         "city", "hour_of_day", "day_of_week", "scene", "position", "query_topic", "ad_source",
         "user_recent_categories", "item_tags", "price", "item_age_days", "item_ctr_7d", "user_orders_30d",
         "user_clicks_30d", "item_sales_30d", "shop_rating", "discount_rate", "click", "conversion",
         "stay_seconds", "collect", "cart", "true_p_click", "true_p_conversion", "true_p_collect",
         "true_p_cart", "true_stay_seconds"]


def read_day(root: Path, day: str) -> pa.Table:
    files = sorted((root / f"dt={day}").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    summary = generate_impressions(root, SMALL, progress=False)
    table = pa.concat_tables([read_day(root, "2026-11-01"), read_day(root, "2026-11-02")])
    return root, summary, table, pl.from_arrow(table)


# ----------------------------------------------------------------------------- contract


def test_schema_names_and_types_exact(small):
    _, _, table, _ = small
    assert table.schema.names == ORDER
    assert {f.name: f.type for f in table.schema} == EXPECTED_TYPES
    assert table.schema.equals(SCHEMA)


def test_hive_layout_files_rows_and_row_groups(small):
    root, summary, _, _ = small
    assert sorted(p.name for p in root.iterdir()) == ["dt=2026-11-01", "dt=2026-11-02"]  # no temp dirs left
    for day in ("2026-11-01", "2026-11-02"):
        files = sorted((root / f"dt={day}").iterdir())
        assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        metas = [pq.ParquetFile(f).metadata for f in files]
        assert [m.num_rows for m in metas] == [10_000, 10_000, 5_000]
        for m in metas:
            sizes = [m.row_group(i).num_rows for i in range(m.num_row_groups)]
            assert all(s == 4_096 for s in sizes[:-1]) and 0 < sizes[-1] <= 4_096
    assert summary.rows_per_day == {"2026-11-01": 25_000, "2026-11-02": 25_000}
    assert summary.rows == 50_000 and len(summary.files) == 6


def test_same_seed_equal_other_seed_different_and_rerun_replaces(small, tmp_path):
    root, _, _, _ = small
    cfg = dataclasses.replace(SMALL, days=1, rows_per_file=25_000)
    generate_impressions(tmp_path / "a", cfg, progress=False)
    assert read_day(tmp_path / "a", "2026-11-01").equals(read_day(root, "2026-11-01"))  # file split irrelevant
    # rerun into the same folder: same content, stale parts of an earlier run are gone
    (tmp_path / "a" / "dt=2026-11-01" / "part-00007.parquet").write_bytes(b"stale")
    generate_impressions(tmp_path / "a", cfg, progress=False)
    assert [p.name for p in (tmp_path / "a" / "dt=2026-11-01").iterdir()] == ["part-00000.parquet"]
    generate_impressions(tmp_path / "b", dataclasses.replace(cfg, seed=4), progress=False)
    other = read_day(tmp_path / "b", "2026-11-01")
    assert other.num_rows == 25_000
    assert not other.equals(read_day(root, "2026-11-01"))
    assert not np.array_equal(other["item_id"].to_numpy(), read_day(root, "2026-11-01")["item_id"].to_numpy())


def test_day_depends_only_on_seed_and_date(tmp_path):
    """Days generated one at a time equal days generated together (also with popularity drift)."""
    cfg = dataclasses.replace(SMALL, rows_per_day=6_000, popularity_drift=0.3, days=3)
    generate_impressions(tmp_path / "all", cfg, progress=False)
    generate_impressions(tmp_path / "one", dataclasses.replace(cfg, days=2), progress=False)
    generate_impressions(tmp_path / "one", dataclasses.replace(cfg, start=date(2026, 11, 3), days=1),
                         progress=False)
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        assert read_day(tmp_path / "one", day).equals(read_day(tmp_path / "all", day)), day
    # a smaller day is a prefix of a bigger one (same chunks, truncated) apart from timestamps
    a = read_day(tmp_path / "all", "2026-11-03")
    b = read_day(tmp_path / "one", "2026-11-03")
    assert a.drop_columns(["ts", "hour_of_day"]).slice(0, 100).equals(b.drop_columns(["ts", "hour_of_day"]).slice(0, 100))


def test_small_files_and_row_groups(tmp_path):
    cfg = dataclasses.replace(SMALL, days=1, rows_per_day=2_500, rows_per_file=1_000, row_group_size=300,
                              start="2026-11-05")
    summary = generate_impressions(tmp_path, cfg, progress=False)
    files = sorted((tmp_path / "dt=2026-11-05").iterdir())
    groups = [[m.row_group(i).num_rows for i in range(m.num_row_groups)]
              for m in (pq.ParquetFile(f).metadata for f in files)]
    assert groups == [[300, 300, 300, 100], [300, 300, 300, 100], [300, 200]]
    assert summary.rows == 2_500 and cfg.start == date(2026, 11, 5)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="task_correlation"):
        generate_impressions(tmp_path, dataclasses.replace(SMALL, task_correlation=1.5), progress=False)
    with pytest.raises(ValueError, match="rows_per_day"):
        generate_impressions(tmp_path, dataclasses.replace(SMALL, rows_per_day=0), progress=False)


# ----------------------------------------------------------------------------- structure


def test_requests_positions_time(small):
    _, _, _, df = small
    req = df.group_by("request_id", maintain_order=True).agg(
        n=pl.len(), users=pl.col("user_id").n_unique(), ts=pl.col("ts").n_unique(),
        ctx=pl.struct("device", "city", "scene", "query_topic").n_unique(),
        pos_ok=(pl.col("position") == pl.int_range(pl.len()).cast(pl.Int16)).all(),
        items=pl.col("item_id").n_unique(), day=pl.col("ts").first().dt.date())
    assert (req["users"] == 1).all() and (req["ts"] == 1).all() and (req["ctx"] == 1).all()
    assert req["pos_ok"].all()
    assert (req["items"] >= req["n"] - 1).all()   # (almost) no item twice in one request
    last = req.group_by("day").agg(pl.col("request_id").last())["request_id"]
    full = req.filter(~pl.col("request_id").is_in(last.implode()))
    assert full["n"].min() >= 10 and full["n"].max() <= 50 and 25 < full["n"].mean() < 35
    assert req["n"].max() <= 50
    for _, g in df.group_by(pl.col("ts").dt.date()):
        assert g["ts"].is_sorted()
    assert (df["ts"].dt.hour().cast(pl.Utf8).str.zfill(2) == df["hour_of_day"]).all()
    assert set(df["day_of_week"].unique()) == {"sun", "mon"}        # 2026-11-01 is a Sunday
    assert df["ts"].dt.date().unique().sort().to_list() == [date(2026, 11, 1), date(2026, 11, 2)]
    assert df["ts"].dt.hour().n_unique() == 24


def test_attributes_fixed_per_user_and_item_and_cardinalities(small):
    _, _, _, df = small
    item_cols = ["category_id", "brand_id", "shop_id", "item_type", "seller_level", "item_origin",
                 "item_style", "item_price_band", "price", "item_tags"]
    per_item = df.group_by("item_id").agg([pl.col(c).n_unique() for c in item_cols])
    assert all((per_item[c] == 1).all() for c in item_cols)
    user_cols = ["user_gender", "user_age_bucket", "user_level", "user_segment", "user_province"]
    per_user = df.group_by("user_id").agg([pl.col(c).n_unique() for c in user_cols])
    assert all((per_user[c] == 1).all() for c in user_cols)
    assert df.group_by("shop_id").agg(pl.col("seller_level").n_unique())["seller_level"].max() == 1
    limits = {"user_gender": 3, "user_age_bucket": 7, "user_level": 10, "user_segment": 200, "user_province": 34,
              "item_type": 20, "seller_level": 10, "item_origin": 300, "item_style": 1000, "item_price_band": 20,
              "device": 5, "os_version": 60, "app_version": 200, "network": 5, "city": 400, "scene": 15,
              "query_topic": 10_000, "ad_source": 30}
    for col, k in limits.items():
        assert 1 < df[col].n_unique() <= k, col
    assert df["user_id"].max() < SMALL.n_users and df["item_id"].max() < SMALL.n_items
    assert df["category_id"].max() < SMALL.n_categories and df["brand_id"].max() < SMALL.n_brands
    assert df["shop_id"].max() < SMALL.n_shops and df["position"].max() <= 49


def test_multi_hot_and_numeric_features(small):
    _, _, _, df = small
    rec_len, tag_len = df["user_recent_categories"].list.len(), df["item_tags"].list.len()
    assert 4.5 < rec_len.mean() < 5.5 and 2.6 < tag_len.mean() < 3.4
    assert (rec_len == 0).sum() > 0 and (tag_len == 0).sum() > 0
    cats = df["user_recent_categories"].explode().drop_nulls()
    as_int = cats.cast(pl.Int64)
    assert (as_int.cast(pl.Utf8) == cats).all() and as_int.max() < SMALL.n_categories
    tags = df["item_tags"].explode().drop_nulls()
    assert tags.str.starts_with("t").all() and tags.str.slice(1).cast(pl.Int64).max() < 5000
    # the recent categories mostly contain the category of items the user engages with
    hit = df.select(pl.col("user_recent_categories").list.contains(pl.col("category_id").cast(pl.Utf8)))
    assert hit.to_series().mean() > 0.1
    num = ["price", "item_age_days", "item_ctr_7d", "user_orders_30d", "user_clicks_30d", "item_sales_30d",
           "shop_rating", "discount_rate"]
    assert df.select(pl.col(num).is_finite().all()).row(0) == (True,) * len(num)
    assert df["price"].min() > 0 and df["item_age_days"].min() >= 0
    assert df["shop_rating"].is_between(0, 5).all() and df["discount_rate"].is_between(0, 1).all()
    assert df["item_ctr_7d"].is_between(0, 1).all()
    assert df.select(pl.col(num).std()).row(0) > (0,) * len(num)


def test_zipf_popularity(small):
    _, _, _, df = small
    for col, n in (("item_id", SMALL.n_items), ("user_id", SMALL.n_users)):
        counts = df[col].value_counts()["count"].sort(descending=True)
        top = counts.head(max(n // 100, 1)).sum() / len(df)
        assert top > 0.2, (col, top)             # 20x a uniform law (at 5e5 items it is ~0.5)
        assert counts[0] / len(df) < 0.05, col   # no single id takes the feed
    # popular ids are not simply the smallest ids
    top_items = df["item_id"].value_counts().sort("count", descending=True)["item_id"].head(20)
    assert top_items.max() > 100


# ----------------------------------------------------------------------------- labels


def test_label_invariants(small):
    _, _, _, df = small
    no_click = df.filter(pl.col("click") == 0)
    for col in ("conversion", "collect", "cart"):
        assert (no_click[col] == 0).all(), col
        assert set(df[col].unique()) <= {0, 1}
    assert ((df["stay_seconds"] > 0) == (df["click"] == 1)).all()
    assert (df["stay_seconds"] >= 0).all()
    for col in ("true_p_click", "true_p_conversion", "true_p_collect", "true_p_cart"):
        assert df[col].is_between(0, 1).all() and df[col].null_count() == 0, col
    assert (df["true_stay_seconds"] > 0).all()


def test_marginal_rates_and_summary(small):
    _, summary, _, df = small
    clicked = df.filter(pl.col("click") == 1)
    click, cvr = df["click"].mean(), clicked["conversion"].mean()
    collect, cart = df["collect"].mean(), df["cart"].mean()
    assert 0.04 < click < 0.06 and 0.07 < cvr < 0.13
    assert 0.014 < collect < 0.026 and 0.014 < cart < 0.026
    assert 20 < clicked["stay_seconds"].mean() < 40
    assert summary.click_rate == pytest.approx(click) and summary.cvr_given_click == pytest.approx(cvr)
    assert summary.collect_rate == pytest.approx(collect) and summary.cart_rate == pytest.approx(cart)
    assert summary.mean_stay_given_click == pytest.approx(clicked["stay_seconds"].mean(), rel=1e-5)
    # the truth columns are calibrated: mean probability matches the observed rate
    assert df["true_p_click"].mean() == pytest.approx(click, rel=0.1)
    assert clicked["true_p_conversion"].mean() == pytest.approx(cvr, rel=0.2)


def test_signal_is_learnable(small):
    _, _, _, df = small
    y = df["click"].to_numpy()
    oracle = roc_auc_score(y, df["true_p_click"].to_numpy())
    assert 0.68 < oracle < 0.85
    assert roc_auc_score(y, df["item_ctr_7d"].to_numpy()) > 0.55
    assert roc_auc_score(y, -df["position"].to_numpy()) > 0.52          # position bias
    clicked = df.filter(pl.col("click") == 1)
    for label, truth in (("conversion", "true_p_conversion"), ("collect", "true_p_collect"), ("cart", "true_p_cart")):
        assert roc_auc_score(clicked[label].to_numpy(), clicked[truth].to_numpy()) > 0.62, label
    stay = clicked.select(pl.corr(pl.col("stay_seconds").log(), pl.col("true_stay_seconds").log())).item()
    assert stay > 0.3


def test_task_correlation_knob(tmp_path):
    corr = {}
    for rho in (0.0, 0.95):
        cfg = dataclasses.replace(SMALL, days=1, rows_per_day=20_000, task_correlation=rho)
        generate_impressions(tmp_path / str(rho), cfg, progress=False)
        t = read_day(tmp_path / str(rho), "2026-11-01")
        lc, lv = logit(t["true_p_click"].to_numpy()), logit(t["true_p_conversion"].to_numpy())
        corr[rho] = np.corrcoef(lc, lv)[0, 1]
    assert corr[0.95] > corr[0.0] + 0.3, corr


def test_popularity_drift_moves_items(tmp_path):
    def top_overlap(drift: float) -> float:
        cfg = dataclasses.replace(SMALL, days=2, rows_per_day=15_000, popularity_drift=drift, rows_per_file=15_000)
        generate_impressions(tmp_path / str(drift), cfg, progress=False)
        tops = [set(pl.from_arrow(read_day(tmp_path / str(drift), d))["item_id"].value_counts()
                    .sort("count", descending=True)["item_id"].head(100)) for d in ("2026-11-01", "2026-11-02")]
        return len(tops[0] & tops[1]) / 100
    assert top_overlap(0.0) > top_overlap(1.0) + 0.3


# ----------------------------------------------------------------------------- MMoE regression


def test_mmoe_synthetic_shapes_determinism_and_correlation():
    X, Y = mmoe_synthetic(20_000, 0.5, seed=0)
    assert X.shape == (20_000, 100) and Y.shape == (20_000, 2)
    assert X.dtype == np.float32 and Y.dtype == np.float32
    X2, Y2 = mmoe_synthetic(20_000, 0.5, seed=0)
    assert np.array_equal(X, X2) and np.array_equal(Y, Y2)
    X3, Y3 = mmoe_synthetic(20_000, 0.5, seed=1)
    assert not np.array_equal(Y, Y3)
    Xs, Ys = mmoe_synthetic(1_000, 0.5, seed=0)                  # a larger n extends a smaller one
    assert np.array_equal(Xs, X[:1_000]) and np.array_equal(Ys, Y[:1_000])
    corr = [np.corrcoef(mmoe_synthetic(20_000, p, seed=0)[1].T)[0, 1] for p in (1.0, 0.9, 0.5, 0.0)]
    assert corr[0] > 0.95
    assert all(a > b for a, b in zip(corr, corr[1:])), corr
    assert abs(corr[-1]) < 0.1
    assert mmoe_synthetic(0, 0.5, dim=8, m=3)[0].shape == (0, 8)
    with pytest.raises(ValueError):
        mmoe_synthetic(10, 1.5)
