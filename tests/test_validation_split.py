"""Validation on a hashed share of requests (train.validation_fraction): both sides partition the
window by request, the accounting balances on each, and a job validates, stops early and calibrates
on it without giving up a day."""
from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pytest
from pydantic import ValidationError

from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.reader import ImpressionReader, validation_requests
from mtrank.pipeline.trainer import TrainConfig
from tests.conftest import generate_demo_logs, mtrank_in_process, small_spec, write_job
from tests.test_reader import D1, D2, unique_rows, write_day


@pytest.fixture
def logs(tmp_path, spec):
    root = tmp_path / "logs"
    # 5 rows per request: every row of a request must land on the same side
    frames = [unique_rows(spec, 600, s, p).with_columns(
        (pl.lit(p) + (pl.int_range(600) // 5).cast(pl.String)).alias(spec.request_id)) for s, p in ((1, "a"), (2, "b"))]
    write_day(root, D1, [frames[0]])
    write_day(root, D2, [frames[1]])
    return root


def test_the_two_sides_partition_the_window_by_request(logs, spec):
    window = open_window(logs, spec)
    sides = {}
    for validation in (False, True):
        r = ImpressionReader(window, spec, progress=False, extra_columns=(spec.request_id,),
                             holdout=(spec.request_id, 0.25, validation))
        rows = pl.concat([pl.from_arrow(rb) for rb in r.frames()])
        acc = r.accounting
        assert acc.balanced and acc.rows_read == 1200 and acc.rows_accepted + acc.held_out == 1200
        sides[validation] = rows
    train, val = sides[False], sides[True]
    assert train.height + val.height == 1200
    assert 0.15 < val.height / 1200 < 0.35                      # about the fraction (240 requests)
    assert set(train[spec.request_id]).isdisjoint(set(val[spec.request_id]))
    assert (val.group_by(spec.request_id).len()["len"] == 5).all()   # whole requests


def test_without_a_request_id_rows_split_by_position_stably(logs, spec):
    """Tabular data (a spec with request_id: null): rows, not requests, on each side; the same rows on
    every pass; both sides partition the window and the accounting balances."""
    window = open_window(logs, spec)
    sides = {}
    for validation in (False, True):
        passes = []
        for _ in range(2):
            r = ImpressionReader(window, spec, progress=False, extra_columns=(spec.request_id,),
                                 holdout=(None, 0.25, validation))
            passes.append(pl.concat([pl.from_arrow(rb) for rb in r.frames()]))
            assert r.accounting.balanced and r.accounting.rows_accepted + r.accounting.held_out == 1200
        assert passes[0].equals(passes[1])
        sides[validation] = passes[0]
    assert sides[False].height + sides[True].height == 1200 and 0.18 < sides[True].height / 1200 < 0.32
    key = [spec.request_id, "user_id", "item_id", "position"]
    assert sides[False].select(key).unique().height == sides[False].height                # a row key
    assert sides[False].select(key).join(sides[True].select(key), on=key).height == 0   # disjoint rows
    split = pl.concat([sides[False].select(key).with_columns(v=False), sides[True].select(key).with_columns(v=True)])
    mixed = split.group_by(spec.request_id).agg(pl.col("v").n_unique() == 2)["v"].sum()
    assert mixed > 0                                       # rows, not whole requests: requests are split


def test_the_split_is_stable_and_nulls_train():
    ids = pa.array(["x1", "x2", None, "x3"] * 1000)
    a, b = validation_requests(ids, 0.3), validation_requests(ids, 0.3)
    assert (a == b).all() and not a[2::4].any()
    assert (validation_requests(ids, 0.3) >= validation_requests(ids, 0.1)).all()   # nested fractions


def test_config_rules():
    with pytest.raises(ValidationError, match="set one"):
        TrainConfig(validation_days=1, validation_fraction=0.1)
    TrainConfig(validation_fraction=0.1, calibration="platt", early_stopping={"patience": 1})
    with pytest.raises(ValidationError, match="validation_fraction"):
        TrainConfig(calibration="platt")


@pytest.mark.slow
def test_a_job_validates_and_calibrates_on_a_request_fraction(tmp_path):
    generate_demo_logs(tmp_path / "logs", days=3, rows=4000, seed=5, users=800, items=300)
    small_spec(tmp_path / "spec.yaml")
    write_job(tmp_path / "job.yaml", "frac", {"batch_size": 256, "epochs": 2, "validation_fraction": 0.2,
                                             "calibration": "platt", "early_stopping": {"patience": 1}},
              window_days=2)
    r = mtrank_in_process("train", "--config", tmp_path / "job.yaml", "--date", "2026-11-03", "--no-track", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held out" in r.stdout
    m = json.loads((tmp_path / "work" / "runs" / "frac" / "2026-11-03" / "metrics.json").read_text())
    rows, epochs = m["rows"], len(m["epochs"])
    assert rows["read"] == rows["trained"] + rows["rejected"] + rows["sampled_out"] + rows["held_out"]
    assert 0.1 < rows["held_out"] / rows["read"] < 0.3                   # both training days, 20 % of requests
    assert rows["read"] == epochs * 8000
    assert m["train_window"] == m["validation_window"]                  # no day given up
    assert len(m["history"]["validation"]) == epochs and m["calibration"]["ctr"]["fitted"]
