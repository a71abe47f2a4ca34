"""Candidate days for scoring (generate_candidates, `mtrank generate --candidates`) and per-item
exposure counts (count_exposures, `mtrank exposures`). Small universes, real Parquet in tmp_path."""
from __future__ import annotations

import dataclasses
import subprocess
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import MTRANK, generate_demo_logs
from mtrank.features.featurize import Featurizer
from mtrank.features.numeric import NumericStats
from mtrank.features.rules import EMPTY_PARTITION, MISSING_COLUMN, MISSING_PARTITION, NULL, BadInputError, check_schema
from mtrank.jobs.cli import main as cli_main
from mtrank.jobs.exposures import count_exposures
from mtrank.pipeline.synthetic import CANDIDATE_SCHEMA, SCHEMA, ImpressionConfig, generate_candidates, generate_impressions
from mtrank.pipeline.synthetic.candidates import _campaign, _quality_scores
from mtrank.pipeline.synthetic.impressions import _Universe

CFG = ImpressionConfig(seed=5, start=date(2026, 11, 8), days=1, rows_per_day=2_000, n_users=5_000, n_items=3_000,
                       n_categories=200, n_brands=1_000, n_shops=1_500, rows_per_file=1_500, row_group_size=500)
DAY = date(2026, 11, 8)
LABELS = ["click", "conversion", "stay_seconds", "collect", "cart"]
TRUTH = ["true_p_click", "true_p_conversion", "true_p_collect", "true_p_cart", "true_stay_seconds"]


def read_day(root: Path, day: date) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((root / f"dt={day}").glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def cands(tmp_path_factory):
    root = tmp_path_factory.mktemp("cands")
    summary = generate_candidates(root, CFG, DAY, requests=60, per_request=50, progress=False)
    table = read_day(root, DAY)
    return root, summary, table, pl.from_arrow(table)


# ----------------------------------------------------------------------------- candidates


def test_columns_schema_and_layout(cands):
    root, summary, table, _ = cands
    assert table.schema.equals(CANDIDATE_SCHEMA)
    assert table.schema.names == [n for n in SCHEMA.names if n not in LABELS] + ["in_campaign", "quality_score"]
    assert not set(LABELS) & set(table.schema.names) and set(TRUTH) <= set(table.schema.names)
    assert table.schema.field("in_campaign").type == pa.bool_()
    assert table.schema.field("quality_score").type == pa.float64()
    for name in SCHEMA.names:
        if name not in LABELS:
            assert table.schema.field(name).type == SCHEMA.field(name).type
    assert sorted(p.name for p in root.iterdir()) == [f"dt={DAY}"]            # no temp folder left
    assert [Path(f).name for f in summary.files] == ["part-00000.parquet", "part-00001.parquet"]
    assert summary.rows == table.num_rows and summary.requests == 60
    assert summary.to_dict()["rows_per_second"] > 0


def test_requests_unique_items_shared_ts_position_zero(cands):
    _, summary, _, df = cands
    assert df.select(pl.struct("request_id", "item_id").is_duplicated().any()).item() is False
    per = df.group_by("request_id").agg(pl.len().alias("n"), pl.col("ts").n_unique().alias("ts"),
                                         pl.col("user_id").n_unique().alias("users"))
    assert per.height == 60 and per["ts"].max() == 1 and per["users"].max() == 1
    assert per["n"].max() <= 50 and per["n"].min() >= 40 and per["n"].sum() == summary.rows
    assert df["request_id"].str.contains(r"^c20261108-\d{9}$").all()
    assert df["request_id"].n_unique() == 60
    assert (df["position"] == 0).all()
    ts = df["ts"]
    assert ts.min() >= datetime(2026, 11, 8) and ts.max() < datetime(2026, 11, 8) + timedelta(days=1)
    order = df.unique("request_id").sort("request_id")["ts"]
    assert order.is_sorted()                                                 # diurnal curve, in request order
    for c in TRUTH:
        assert df[c].is_finite().all()
    assert ((df["true_p_click"] > 0) & (df["true_p_click"] < 1)).all()


def test_deterministic_and_day_dependent(cands, tmp_path):
    root, _, table, _ = cands
    again = generate_candidates(tmp_path / "a", CFG, DAY, requests=60, per_request=50, progress=False)
    for f in again.files:
        assert Path(f).read_bytes() == (root / f"dt={DAY}" / Path(f).name).read_bytes()
    generate_candidates(tmp_path / "b", CFG, DAY + timedelta(days=1), requests=60, per_request=50, progress=False)
    other = read_day(tmp_path / "b", DAY + timedelta(days=1))
    assert other["request_id"][0].as_py().startswith("c20261109-")
    assert other["item_id"].to_pylist() != table["item_id"].to_pylist()
    assert other["user_id"].to_pylist() != table["user_id"].to_pylist()


def test_campaign_and_quality_per_item(cands, tmp_path):
    _, _, _, df = cands
    per_item = df.group_by("item_id").agg(pl.col("in_campaign").n_unique().alias("c"),
                                          pl.col("quality_score").n_unique().alias("q"))
    assert per_item["c"].max() == 1 and per_item["q"].max() == 1
    assert df["quality_score"].min() >= 0.0 and df["quality_score"].max() <= 1.0
    # other requests of the same day: same flags for the same items
    generate_candidates(tmp_path, CFG, DAY, requests=30, per_request=80, progress=False)
    more = pl.from_arrow(read_day(tmp_path, DAY))
    j = df.unique("item_id").join(more.unique("item_id"), on="item_id", suffix="_2")
    assert j.height > 100
    assert (j["in_campaign"] == j["in_campaign_2"]).all() and (j["quality_score"] == j["quality_score_2"]).all()
    # rates over the whole universe; quality loosely follows the hidden item quality
    u = _Universe(CFG)
    items = np.arange(CFG.n_items)
    assert 0.03 < _campaign(CFG, DAY, items, 0.05).mean() < 0.07
    assert _campaign(CFG, DAY, items, 0.05).tolist() != _campaign(CFG, DAY + timedelta(days=1), items, 0.05).tolist()
    q = _quality_scores(u, 0.05)
    assert abs((q < 0.2).mean() - 0.05) < 0.005
    assert 0.3 < np.corrcoef(q, u.item_quality)[0, 1] < 0.8


def test_same_universe_as_logs_and_featurizable(cands, spec, tmp_path):
    """Item attributes and day features match the logs of the same cfg/day; the spec can featurize."""
    _, _, table, df = cands
    generate_impressions(tmp_path, CFG, progress=False)
    logs = pl.from_arrow(read_day(tmp_path, DAY))
    cols = ["category_id", "brand_id", "shop_id", "price", "item_ctr_7d", "item_sales_30d", "discount_rate",
            "item_age_days"]
    j = df.unique("item_id").select("item_id", *cols).join(logs.unique("item_id").select("item_id", *cols),
                                                           on="item_id", suffix="_log")
    assert j.height > 50
    for c in cols:
        assert (j[c] == j[f"{c}_log"]).all(), c
    check_schema(table.schema, spec, "candidates", labels=False)
    stats = NumericStats.of_frame(logs, spec)
    arrays = Featurizer(spec, stats).transform(table, with_labels=False)
    assert arrays.rows == arrays.ids.shape[0] == arrays.dense.shape[0] == table.num_rows
    assert np.isfinite(arrays.dense).all() and (arrays.ids > 0).all() and not arrays.labels


def test_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="requests"):
        generate_candidates(tmp_path, CFG, DAY, requests=0, progress=False)
    with pytest.raises(ValueError, match="per_request"):
        generate_candidates(tmp_path, CFG, DAY, requests=1, per_request=CFG.n_items + 1, progress=False)
    with pytest.raises(ValueError, match="campaign_rate"):
        generate_candidates(tmp_path, CFG, DAY, requests=1, campaign_rate=1.5, progress=False)
    assert not hasattr(CFG, "candidates")
    with pytest.raises(TypeError):
        dataclasses.replace(CFG, candidates=True)


def test_cli_generate_candidates(tmp_path):
    args = [*MTRANK, "generate", "--out", str(tmp_path), "--seed", "2", "--users", "2000", "--items", "1000",
            "--candidates", "--date", "2026-11-09", "--requests", "25", "--per-request", "30"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "candidates for 25 requests of 2026-11-09" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    df = pl.read_parquet(tmp_path / "dt=2026-11-09" / "part-00000.parquet")
    assert df["request_id"].n_unique() == 25 and df.height <= 25 * 30 and "click" not in df.columns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dt=2026-11-09"]   # no impression logs
    r = subprocess.run([*MTRANK, "generate", "--out", str(tmp_path), "--candidates"], capture_output=True, text=True)
    assert r.returncode == 2 and "--date" in r.stderr


# ----------------------------------------------------------------------------- exposures


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    generate_demo_logs(root, days=1, rows=3_000, seed=4, users=2_000, items=1_000)
    return root


def test_exposures_cli_matches_group_by(logs, tmp_path):
    out = tmp_path / "exp" / "exposures.parquet"
    r = subprocess.run([*MTRANK, "exposures", "--data", str(logs), "--date", "2026-11-01", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out)
    assert got.schema == pa.schema([("item_id", pa.int64()), ("dt", pa.date32()), ("exposures", pa.int64())])
    logs_day = pq.read_table(logs / "dt=2026-11-01")
    want = logs_day.group_by("item_id").aggregate([("item_id", "count")]).sort_by("item_id")
    assert got["item_id"].to_pylist() == want["item_id"].to_pylist()
    assert got["exposures"].to_pylist() == want["item_id_count"].to_pylist()
    assert sum(got["exposures"].to_pylist()) == logs_day.num_rows == 3_000
    assert set(got["dt"].to_pylist()) == {date(2026, 11, 1)}
    assert [p.name for p in out.parent.iterdir()] == ["exposures.parquet"]   # no temp file left


def test_exposures_missing_partition_exit_code(logs, tmp_path):
    r = subprocess.run([*MTRANK, "exposures", "--data", str(logs), "--date", "2026-11-05",
                        "--out", str(tmp_path / "e.parquet")], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{logs}/dt=2026-11-05" in r.stderr and MISSING_PARTITION in r.stderr
    assert not (tmp_path / "e.parquet").exists()


def _write_part(root: Path, day: str, table: pa.Table) -> Path:
    (root / f"dt={day}").mkdir(parents=True, exist_ok=True)
    path = root / f"dt={day}" / "part-00000.parquet"
    pq.write_table(table, path)
    return path


def test_exposures_string_ids_and_bad_input(tmp_path):
    root = tmp_path / "logs"
    _write_part(root, "2026-11-02", pa.table({"item_id": ["b", "a", "b", "c", "b"], "x": [1, 2, 3, 4, 5]}))
    s = count_exposures(root, date(2026, 11, 2), tmp_path / "out.parquet")
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.schema.field("item_id").type == pa.string()
    assert got.to_pydict() == {"item_id": ["a", "b", "c"], "dt": [date(2026, 11, 2)] * 3, "exposures": [1, 3, 1]}
    assert (s.rows, s.items) == (5, 3)

    bad = _write_part(root, "2026-11-03", pa.table({"item": [1, 2]}))
    with pytest.raises(BadInputError) as e:
        count_exposures(root, date(2026, 11, 3), tmp_path / "o.parquet")
    assert e.value.rule == MISSING_COLUMN and e.value.column == "item_id" and e.value.file == str(bad)

    _write_part(root, "2026-11-04", pa.table({"item_id": pa.array([1, None, 2, None], pa.int64())}))
    with pytest.raises(BadInputError) as e:
        count_exposures(root, date(2026, 11, 4), tmp_path / "o.parquet")
    assert e.value.rule == NULL and e.value.count == 2

    (root / "dt=2026-11-06").mkdir()
    with pytest.raises(BadInputError) as e:
        count_exposures(root, date(2026, 11, 6), tmp_path / "o.parquet")
    assert e.value.rule == EMPTY_PARTITION and "dt=2026-11-06" in e.value.file

    with pytest.raises(BadInputError) as e:
        count_exposures(root, date(2026, 11, 7), tmp_path / "o.parquet")
    assert e.value.rule == MISSING_PARTITION and "dt=2026-11-07" in e.value.file
    assert not (tmp_path / "o.parquet").exists()


def test_exposures_spec_item_column(logs, tmp_path, capsys):
    spec = str(Path(__file__).resolve().parents[1] / "features" / "default_spec.yaml")
    base = ["exposures", "--data", str(logs), "--date", "2026-11-01", "--spec", spec]
    assert cli_main([*base, "--out", str(tmp_path / "a.parquet")]) == 0
    assert cli_main([*base, "--out", str(tmp_path / "b.parquet"), "--item-column", "no_such"]) == 2
    assert "no_such" in capsys.readouterr().err and not (tmp_path / "b.parquet").exists()
