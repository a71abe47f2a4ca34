"""Negative down-sampling: deterministic rows, counted, and a model recalibrated for the keep rate."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from mtrank.pipeline.dataset import RowGroup, open_window
from mtrank.pipeline.reader import ImpressionReader, keep_mask
from tests.conftest import generate_demo_logs, make_frame, mtrank_in_process, small_spec, write_job


def test_the_kept_rows_depend_on_the_row_only():
    g = RowGroup("/data/logs/dt=2026-11-01/part-0.parquet", 3, 200_000, dt.date(2026, 11, 1))
    m = keep_mask(g, 0, 200_000, 0.2)
    assert abs(m.mean() - 0.2) < 0.005
    assert np.array_equal(m, keep_mask(g, 0, 200_000, 0.2))                       # reruns: the same rows
    assert np.array_equal(m[5_000:9_000], keep_mask(g, 5_000, 4_000, 0.2))         # whatever the chunking
    moved = RowGroup("/mnt/other/dt=2026-11-01/part-0.parquet", 3, 200_000, g.date)
    assert np.array_equal(m, keep_mask(moved, 0, 200_000, 0.2))                    # wherever the root is mounted
    assert not np.array_equal(m, keep_mask(RowGroup(g.file, 4, 200_000, g.date), 0, 200_000, 0.2))
    assert np.all(keep_mask(g, 0, 1000, 0.5) <= keep_mask(g, 0, 1000, 0.7))         # nested across rates


def test_the_reader_keeps_every_positive_and_counts_the_negatives_it_leaves_out(spec, tmp_path):
    day = tmp_path / "logs" / "dt=2026-11-01"
    day.mkdir(parents=True)
    frame = make_frame(spec, 40_000, seed=3)
    frame.write_parquet(day / "part-0.parquet", row_group_size=10_000)
    window = open_window(tmp_path / "logs", spec)
    clicks = int(frame["click"].sum())

    def read(**kw):
        r = ImpressionReader(window, spec, negatives=("click", 0.25), **kw)
        rows = [rb for rb in r.frames()]
        return r.accounting, np.concatenate([rb.column("click").to_numpy() for rb in rows])

    acc, labels = read()
    assert acc.balanced and acc.rows_read == 40_000 and acc.rows_rejected == 0
    assert int(labels.sum()) == clicks                                    # every positive trained
    negatives = 40_000 - clicks
    assert acc.sampled_out == negatives - int((labels == 0).sum())
    assert abs((labels == 0).sum() / negatives - 0.25) < 0.02
    assert acc.as_dict()["sampled_out"] == acc.sampled_out
    # two ranks together read exactly the rows one reader keeps; shuffling changes no choice
    parts = [read(rank=r, world_size=2, shuffle=True, seed=9)[0] for r in (0, 1)]
    assert sum(p.rows_accepted for p in parts) == acc.rows_accepted
    assert sum(p.sampled_out for p in parts) == acc.sampled_out


@pytest.mark.slow
def test_a_model_trained_on_a_fifth_of_the_negatives_predicts_the_true_rate(tmp_path):
    generate_demo_logs(tmp_path / "logs", days=3, rows=15_000, seed=21, users=1500, items=600)
    small_spec(tmp_path / "spec.yaml")
    write_job(tmp_path / "job.yaml", "sampled", {"batch_size": 512, "epochs": 1, "lr": 0.003,
                                                 "negative_sampling": {"task": "ctr", "keep_rate": 0.2}})
    r = mtrank_in_process("train", "--config", tmp_path / "job.yaml", "--date", "2026-11-03", "--no-track", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "work" / "runs" / "sampled" / "2026-11-03"
    summary = json.loads((run / "metrics.json").read_text())
    rows = summary["rows"]
    assert rows["read"] == rows["trained"] + rows["rejected"] + rows["sampled_out"] and rows["sampled_out"] > 15_000
    ctr = summary["tasks"]["ctr"]
    assert ctr["pcoc_uncalibrated"] > 2.5                 # trained on ~5x the click rate
    assert abs(ctr["pcoc"] - 1) < 0.2                     # recalibrated by log(0.2) on its logit
    assert summary["calibration"]["ctr"]["shift"] == pytest.approx(np.log(0.2))
    training = json.loads((run / "model" / "training.json").read_text())
    assert training["negative_sampling"] == {"task": "ctr", "keep_rate": 0.2}
    # scoring must not divide by the keep rate a second time
    write_job(tmp_path / "twice.yaml", "sampled", {"batch_size": 512},
              score={"fusion": {"negative_keep_rate": {"ctr": 0.2}}})
    r = mtrank_in_process("score", "--config", tmp_path / "twice.yaml", "--model", run / "model",
                          "--candidates", tmp_path / "logs" / "dt=2026-11-03", "--date", "2026-11-03",
                          "--out", tmp_path / "ranked.parquet", "--no-track", cwd=tmp_path)
    assert r.returncode == 2 and "already recalibrated" in r.stderr, r.stderr[-2000:]
