"""Bring your own logs: data the generator did not write, tasks named anything, YAML alone.

1. UCI Adult (../shared/data/adult.parquet) laid out as day partitions: init-spec -> validate ->
   daily over three dates (first version promoted, a model that learned nothing rejected on a task
   no tolerance names) -> evaluate -> score with a fusion over the spec's outputs -> tune-fusion.
2. Generated logs with every label, id and task renamed, through the same CLI.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import SMALL_MODEL, generate_demo_logs, mtrank_in_process, sqlite_client

ADULT = Path(__file__).parents[2] / "shared" / "data" / "adult.parquet"
DAYS = [f"2024-01-0{d}" for d in range(1, 6)]
TRAIN = {"batch_size": 512, "epochs": 2, "lr": 0.003}
NO_RULES = {"window": {"enabled": False}, "new_item": {"enabled": False}, "campaign": {"enabled": False},
            "low_quality": {"enabled": False}, "traffic_cap": {"enabled": False}}


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return mtrank_in_process(*map(str, args), cwd=cwd)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def adult_days(root: Path) -> int:
    """Adult as five day partitions of shuffled rows, two 0/1 labels derived from its columns, a
    request id (groups of 25 people: one 'list' to rank) and a person id (the ranked item)."""
    df = pl.read_parquet(ADULT)
    n = df.height
    order = np.random.default_rng(0).permutation(n)
    df = df[order].with_columns(
        high_income=(pl.col("income") == ">50K").cast(pl.Int8),
        never_married=(pl.col("marital-status") == "Never-married").cast(pl.Int8),
        person_id=pl.int_range(0, n, dtype=pl.Int64),
        request_id=pl.format("q{}", pl.int_range(0, n) // 25))
    per = n // len(DAYS) + 1
    for i, day in enumerate(DAYS):
        part = root / f"dt={day}"
        part.mkdir(parents=True)
        pq.write_table(df.slice(i * per, per).to_arrow(), part / "part-0.parquet")
    return n


@pytest.fixture(scope="module")
def adult(tmp_path_factory):
    base = tmp_path_factory.mktemp("adult")
    rows = adult_days(base / "logs")
    ok(run("init-spec", "--data", "logs", "--label", "high_income", "--label", "never_married",
           "--exclude", "income", "--exclude", "marital-status", "--exclude", "person_id",
           "--request-id", "request_id", "--out", "spec.yaml", cwd=base))
    job = {"name": "adult", "data": "logs", "spec": "spec.yaml", "window_days": 2, "work_dir": "work",
           "model": SMALL_MODEL, "train": TRAIN,
           "score": {**NO_RULES, "item_column": "person_id", "list_size": 10,
                     "fusion": {"factors": [
                         {"output": "p_high_income"},
                         {"output": "p_never_married", "offset": 0.1, "exponent": 0.5,
                          "search": {"offset": {"lo": 0.01, "hi": 1.0}, "exponent": {"lo": 0.0, "hi": 2.0}}}]},
                     "tune": {"gains": {"high_income": 2, "never_married": 1}}}}
    (base / "job.yaml").write_text(yaml.safe_dump(job))
    bad = {**job, "train": {**TRAIN, "lr": 1e-7, "sparse_lr": 1e-7, "epochs": 1}}   # learns nothing
    (base / "bad.yaml").write_text(yaml.safe_dump(bad))
    return base, rows


def test_adult_spec_is_inferred_and_validates(adult):
    base, rows = adult
    spec = yaml.safe_load((base / "spec.yaml").read_text())
    assert [t["name"] for t in spec["tasks"]] == ["high_income", "never_married"]
    assert spec["group_key"] is None and spec["request_id"] == "request_id"
    feats = {f["name"]: f["kind"] for f in spec["features"]}
    assert feats["age"] == "numeric" and feats["workclass"] == "categorical"
    assert not {"income", "marital-status", "person_id", "high_income", "never_married"} & set(feats)
    out = ok(run("validate", "--data", "logs", "--spec", "spec.yaml", "--json", "validate.json", cwd=base))
    report = json.loads((base / "validate.json").read_text())
    assert report["accounting"]["rows_read"] == rows and report["accounting"]["rows_rejected"] == 0, out


def test_days_written_with_other_column_widths_read_as_one_window(adult, tmp_path):
    """Real logs change writers: day 2 holds the integers as int32 and the labels as int64, day 3 comes
    in two files whose item ids differ in width. validate, the training window's label counts and
    exposures read them as the same data (the multi-file scan failed with a polars traceback)."""
    base, rows = adult
    mixed = tmp_path / "logs"
    shutil.copytree(base / "logs", mixed)
    day2 = next((mixed / f"dt={DAYS[1]}").glob("*.parquet"))
    t = pq.read_table(day2)
    narrow = {f.name: pa.int32() if f.type == pa.int64() else pa.int64() if f.type == pa.int8() else f.type
              for f in t.schema}
    pq.write_table(t.cast(pa.schema([pa.field(n, narrow[n]) for n in t.column_names])), day2)
    day3 = next((mixed / f"dt={DAYS[2]}").glob("*.parquet"))
    t = pq.read_table(day3)
    half = t.num_rows // 2
    pq.write_table(t.slice(0, half), day3)
    pq.write_table(t.slice(half).set_column(t.schema.get_field_index("person_id"), "person_id",
                                            t.slice(half)["person_id"].cast(pa.int32())), day3.with_name("part-1.parquet"))
    reports = {}
    for name, logs in (("as written", base / "logs"), ("mixed", mixed)):
        ok(run("validate", "--data", logs, "--spec", base / "spec.yaml", "--json", tmp_path / f"{name}.json", cwd=base))
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    reports["mixed"]["accounting"].pop("row_groups")   # day 3 is two files now
    reports["as written"]["accounting"].pop("row_groups")
    for key in ("accounting", "collisions", "id_counts", "duplicate_rows"):
        assert reports["mixed"][key] == reports["as written"][key], key
    assert reports["mixed"]["accounting"]["rows_read"] == rows

    from mtrank.features.spec import load_spec
    from mtrank.pipeline.dataset import check_labels, open_window

    spec = load_spec(str(base / "spec.yaml"))
    counts = [check_labels(open_window(logs, spec, dt.date.fromisoformat(DAYS[0]), dt.date.fromisoformat(DAYS[2])),
                           spec, 1) for logs in (base / "logs", mixed)]
    assert counts[0] == counts[1]
    for logs, out in ((base / "logs", tmp_path / "a.parquet"), (mixed, tmp_path / "b.parquet")):
        # the job names the item column (score.item_column: person_id); --data overrides its data
        ok(run("exposures", "--config", "job.yaml", "--data", logs, "--date", DAYS[2], "--out", out, cwd=base))
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.num_rows == b.num_rows > 0 and a.column("exposures").equals(b.column("exposures"))


def warehouse_layout(src: Path, dst: Path, days: list[str]) -> None:
    """The days of `src` (dt=YYYY-MM-DD/) as a Spark job writes them with partitionBy("ds", "hour"):
    ds=YYYYMMDD/hour=HH/part-*.parquet, a _SUCCESS marker, checksum files and an aborted task's
    leftovers under _temporary/ (not Parquet at all: reading it would fail)."""
    for day in days:
        t = pq.read_table(src / f"dt={day}")
        part = dst / f"ds={day.replace('-', '')}"
        for i, hour in enumerate(("00", "12")):
            (part / f"hour={hour}").mkdir(parents=True)
            half = t.slice(0, t.num_rows // 2) if i == 0 else t.slice(t.num_rows // 2)
            pq.write_table(half, part / f"hour={hour}" / "part-00000.parquet")
            (part / f"hour={hour}" / ".part-00000.parquet.crc").write_bytes(b"crc")
        (part / "_SUCCESS").touch()
        (part / "_temporary" / "0").mkdir(parents=True)
        (part / "_temporary" / "0" / "part-00009.parquet").write_bytes(b"half a file")


def test_a_warehouse_layout_of_day_folders_is_read_as_it_is(adult, tmp_path):
    """Days exported as ds=YYYYMMDD/hour=HH/ (a Spark or MaxCompute export): validate, init-spec,
    exposures, train, evaluate and score read them where they are, as the same rows as the dt= days
    (before: one error asking to rename or copy every folder, a whole copy on an object store)."""
    base, _ = adult
    ds = tmp_path / "ds"
    warehouse_layout(base / "logs", ds, DAYS[:3])
    rows = sum(pq.read_metadata(f).num_rows for d in DAYS[:3] for f in (base / "logs" / f"dt={d}").glob("*.parquet"))
    ok(run("validate", "--data", ds, "--spec", base / "spec.yaml", "--json", tmp_path / "v.json", cwd=base))
    report = json.loads((tmp_path / "v.json").read_text())
    acc = report["accounting"]
    assert acc["rows_read"] == rows and acc["rows_rejected"] == 0 and report["window"]["files"] == 6, report
    ok(run("init-spec", "--data", ds, "--label", "high_income", "--out", tmp_path / "spec.yaml", cwd=base))
    assert "read day partitions" not in (tmp_path / "spec.yaml").read_text()   # said only for a plain folder

    for logs, out in ((base / "logs", tmp_path / "a.parquet"), (ds, tmp_path / "b.parquet")):
        ok(run("exposures", "--config", "job.yaml", "--data", logs, "--date", DAYS[0], "--out", out, cwd=base))
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))

    day_rows = {d: sum(pq.read_metadata(f).num_rows for f in (ds / f"ds={d.replace('-', '')}").glob("hour=*/*.parquet"))
                for d in DAYS[:3]}
    out = ok(run("train", "--config", "job.yaml", "--data", ds, "--date", DAYS[2], "--no-track",
                 "--work-dir", tmp_path / "work", cwd=base))
    n = day_rows[DAYS[0]] + day_rows[DAYS[1]]   # both hours of the window's two days, each of the 2 epochs
    assert f"trained {TRAIN['epochs'] * n:,} rows (read {TRAIN['epochs'] * n:,}, rejected 0)" in out, out[-2000:]
    model = tmp_path / "work" / "runs" / "adult" / DAYS[2] / "model"
    ok(run("evaluate", "--config", "job.yaml", "--model", model, "--data", ds, "--date", DAYS[2],
           "--out", tmp_path / "eval", cwd=base))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["high_income"]["rows"] == \
        day_rows[DAYS[2]]
    # candidates under the same layout: score finds the day's folder among ds= folders
    ok(run("score", "--config", "job.yaml", "--model", model, "--candidates", ds, "--date", DAYS[1],
           "--out", tmp_path / "ranked.parquet", "--no-track", cwd=base))
    assert pq.read_metadata(tmp_path / "ranked.parquet").num_rows == day_rows[DAYS[1]]

    # a missing day is named in the root's own layout; a root of two layouts is refused, naming both
    r = run("exposures", "--config", "job.yaml", "--data", ds, "--date", "2024-01-09", "--out", tmp_path / "c.parquet",
            cwd=base)
    assert r.returncode == 2 and f"{ds}/ds=20240109: rule missing_partition" in r.stderr, r.stderr[-2000:]
    shutil.copytree(base / "logs" / f"dt={DAYS[3]}", ds / f"dt={DAYS[3]}")
    r = run("validate", "--data", ds, "--spec", base / "spec.yaml", cwd=base)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "day folders of two layouts ('dt=2024-01-04' and 'ds=20240101')" in r.stderr.strip().splitlines()[-1] \
        or "day folders of two layouts ('ds=20240101' and 'dt=2024-01-04')" in r.stderr.strip().splitlines()[-1], \
        r.stderr[-2000:]


def test_a_flat_export_is_laid_out_by_day(tmp_path):
    """One Parquet table with a time column (a data set's single file): `mtrank partition` writes one
    folder per day, every row once, the day in the column's own zone or in --timezone; integers as
    epoch times with --unit; rows without a time, a column that holds no time and days already there
    are one line each, before anything is written. validate pointed at the flat folder names the command."""
    df = pl.read_parquet(ADULT)
    n = df.height
    secs = np.random.default_rng(0).integers(0, 4 * 86_400, n) + 1_704_067_200   # 2024-01-01 .. 04, UTC
    df = df.with_columns(pl.Series("event_s", secs), pl.from_epoch(pl.Series("event_s", secs), time_unit="s")
                         .dt.replace_time_zone("UTC").alias("event_time"),
                         high_income=(pl.col("income") == ">50K").cast(pl.Int8))
    (tmp_path / "flat").mkdir()
    df.write_parquet(tmp_path / "flat" / "adult.parquet")
    want = df.group_by(pl.col("event_time").dt.date().cast(pl.String).alias("d")).len()
    want = dict(zip(want["d"].to_list(), want["len"].to_list()))
    out = ok(run("partition", "--data", "flat", "--time-column", "event_time", "--out", "logs", cwd=tmp_path))
    assert f"wrote {n:,} rows in 4 day folder(s)" in out, out
    got = {p.name.removeprefix("dt="): pq.read_metadata(p / "part-00000.parquet").num_rows
           for p in sorted((tmp_path / "logs").iterdir())}
    assert got == want and sum(got.values()) == n
    day1 = pl.read_parquet(tmp_path / "logs" / "dt=2024-01-01" / "part-00000.parquet")
    assert day1.columns == df.columns and (day1["event_time"].dt.date() == dt.date(2024, 1, 1)).all()

    ok(run("partition", "--data", "flat", "--time-column", "event_s", "--unit", "s", "--out", "epoch", cwd=tmp_path))
    assert sorted(p.name for p in (tmp_path / "epoch").iterdir()) == sorted(p.name for p in (tmp_path / "logs").iterdir())
    ok(run("partition", "--data", "flat/adult.parquet", "--time-column", "event_time", "--timezone", "Asia/Shanghai",
           "--out", "shanghai", cwd=tmp_path))   # UTC+8: the last 8 hours of each UTC day are the next day there
    assert [p.name for p in sorted((tmp_path / "shanghai").iterdir())][-1] == "dt=2024-01-05"

    df.with_columns(pl.when(pl.int_range(0, n) < 3).then(None).otherwise(pl.col("event_time")).alias("event_time")) \
        .write_parquet(tmp_path / "holes.parquet")
    for args, line in (
            (("--data", "holes.parquet", "--time-column", "event_time", "--out", "h"),
             "holes.parquet: column 'event_time': rule null (3 rows): rows without a time cannot be placed"),
            (("--data", "flat", "--time-column", "education", "--out", "h"),
             "column 'education': rule wrong_type: expected a timestamp, a date or integer epoch times"),
            (("--data", "flat", "--time-column", "event_s", "--out", "h"),
             "column 'event_s': rule wrong_type: integers: give their epoch unit (--unit"),
            (("--data", "flat", "--time-column", "event_time", "--out", "logs"),
             "logs: rule day_exists: already holds a folder for 2024-01-01 (4 of the 4 days)")):
        r = run("partition", *args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert line in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert not (tmp_path / "h").exists()

    ok(run("init-spec", "--data", "flat", "--label", "high_income", "--exclude", "income", "--out", "spec.yaml",
           cwd=tmp_path))
    r = run("validate", "--data", "flat", "--spec", "spec.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "found 1 .parquet file(s) directly under it: lay them out by day with `mtrank " \
        "partition --data flat --time-column COLUMN --out DIR`" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    r = run("validate", "--data", "logs", "--spec", "spec.yaml", cwd=tmp_path)
    assert r.returncode == 0 and f"rows read {n:,} = accepted {n:,}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_nested_year_month_day_folders_are_named(adult, tmp_path):
    base, _ = adult
    part = tmp_path / "ymd" / "year=2024" / "month=01" / "day=01"
    shutil.copytree(base / "logs" / f"dt={DAYS[0]}", part)
    for args in (("validate", "--data", tmp_path / "ymd", "--spec", base / "spec.yaml"),
                 ("exposures", "--config", "job.yaml", "--data", tmp_path / "ymd", "--date", DAYS[0],
                  "--out", tmp_path / "exposures.parquet")):
        r = run(*args, cwd=base)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        err = r.stderr.strip().splitlines()[-1]
        assert "rule missing_partition" in err and "found 'year=2024': nested year=/month=/day= folders" in err \
            and "dt=YYYY-MM-DD" in err, err


def test_a_bf16_job_on_a_cpu_without_bf16_is_one_line(adult):
    from mtrank.pipeline.trainer import bf16_supported

    if bf16_supported():
        pytest.skip("this CPU trains bf16")
    base, _ = adult
    job = yaml.safe_load((base / "job.yaml").read_text())
    job["train"]["precision"] = "bf16"
    (base / "bf16.yaml").write_text(yaml.safe_dump(job))
    r = run("train", "--config", "bf16.yaml", "--date", DAYS[2], "--no-track", cwd=base)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("mtrank train: error: train.precision: bf16 needs a CPU with "
                                                 "avx512_bf16 or AMX; use fp32 (or auto)")


def test_a_batch_the_ranks_cannot_split_is_one_line_before_any_rank_starts(adult):
    """512 rows per step over 3 ranks: the launcher says so once (train and daily), instead of
    starting torchrun and three ranks that each die with the same error."""
    base, _ = adult
    for cmd in (("train", "--no-track"), ("daily",)):
        r = run(cmd[0], "--config", "job.yaml", "--date", DAYS[2], "--nproc", "3", *cmd[1:], cwd=base)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "launching" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (f"mtrank {cmd[0]}: error: train.batch_size 512 is the global "
                                                     "batch and must divide evenly over 3 ranks")


@pytest.mark.slow
def test_adult_daily_gate_evaluate_score_tune(adult):
    base, rows = adult
    c = sqlite_client(base)
    out = ok(run("daily", "--config", "job.yaml", "--date", DAYS[2], cwd=base))
    assert "v1: champion (first version" in out
    metrics = json.loads((base / "work" / "runs" / "adult" / DAYS[2] / "metrics.json").read_text())["tasks"]
    assert set(metrics) == {"high_income", "never_married"}
    assert metrics["high_income"]["auc"] > 0.85 and metrics["never_married"]["auc"] > 0.85
    assert "gauc" not in metrics["high_income"]               # no group_key: GAUC omitted
    report = (base / "work" / "runs" / "adult" / DAYS[2] / "report" / "report.html").read_text()
    assert "GAUC is omitted" in report

    ok(run("daily", "--config", "job.yaml", "--date", DAYS[3], cwd=base))
    v2 = c.get_model_version("adult", "2")
    assert v2.tags["promotion.decision"] in ("promoted", "rejected")
    for figure in ("high_income", "never_married"):           # every binary task is gated, none is named
        assert re.match(r"\[-?\d\.\d+, -?\d\.\d+\]", v2.tags[f"gate.{figure}.ci"])

    out = ok(run("daily", "--config", "bad.yaml", "--date", DAYS[4], cwd=base))
    v3 = c.get_model_version("adult", "3")
    assert v3.tags["promotion.decision"] == "rejected", v3.tags
    assert v3.tags["gate.high_income.outcome"] == "fail"
    assert "high_income" in v3.tags["promotion.reason"]
    assert re.search(r"high_income .*\[-\d\.\d+, [-+]\d\.\d+\].*-> FAIL", out, re.I), out   # printed with its interval
    gate = json.loads((base / "work" / "runs" / "adult" / DAYS[4] / "report" / "gate.json").read_text())
    assert {f["name"]: f["outcome"] for f in gate["figures"]}["high_income"] == "fail"
    page = (base / "work" / "runs" / "adult" / DAYS[4] / "report" / "report.html").read_text()
    assert "Promotion gate: not promoted" in page and page.count("<section id='gate'>") == 1
    assert "report/gate.json" in {a.path for a in c.list_artifacts(v3.run_id, "report")}
    # `promote` on a challenger the daily already decided reports that decision as such, evaluating nothing
    out = ok(run("promote", "--config", "job.yaml", "--date", DAYS[4], cwd=base))
    assert out.startswith("adult v3 (challenger): decided before, not promoted (on 2024-01-05 vs champion") and \
        f"nothing evaluated on {DAYS[4]}" in out and "PROMOTED" not in out, out
    champion = str(c.get_model_version_by_alias("adult", "champion").version)
    assert champion in ("1", "2")

    # the job config names the store and the data: neither needs repeating
    out = ok(run("evaluate", "--config", "job.yaml", "--model", "models:/adult@champion", "--date", DAYS[4],
                 "--out", "eval", cwd=base))
    ev = json.loads((base / "eval" / "metrics.json").read_text())["tasks"]
    assert ev["high_income"]["auc"] > 0.85
    table = out.splitlines()[:3]   # task names longer than the header's column stay aligned
    assert [line.index(" all ") for line in table[1:]] == [table[0].index(" population")] * 2, table

    out = ok(run("score", "--config", "job.yaml", "--model", "models:/adult@champion", "--candidates",
                 f"logs/dt={DAYS[4]}", "--date", DAYS[4], "--out", "ranked.parquet", "--no-track", cwd=base))
    assert "score = p_high_income · (0.1 + p_never_married)^0.5 · rule_weight" in out
    ranked = pl.read_parquet(base / "ranked.parquet")
    assert {"p_high_income", "p_never_married", "factor_p_high_income", "factor_p_never_married"} <= set(ranked.columns)
    shown = ranked.filter(pl.col("rank").is_not_null())
    assert shown.group_by("request_id").agg(pl.col("rank").max())["rank"].max() == 10
    p = shown.select(pl.col("p_high_income", "p_never_married").cast(pl.Float64))   # written as float32
    expect = p["p_high_income"] * (0.1 + p["p_never_married"]) ** 0.5
    np.testing.assert_allclose(shown["score"].to_numpy(), expect.to_numpy(), rtol=1e-9)

    # traffic caps from `mtrank exposures` of a job whose items are `person_id`: the counts come back
    # under that name, so score reads them (every person was shown once that day: a cap of 1 is spent)
    ok(run("exposures", "--config", "job.yaml", "--date", DAYS[4], "--out", "exposures.parquet", cwd=base))
    assert pq.read_schema(base / "exposures.parquet").names == ["person_id", "dt", "exposures"]
    job = yaml.safe_load((base / "job.yaml").read_text())
    job["score"]["traffic_cap"] = {"enabled": True, "default_cap": 1}
    (base / "capped.yaml").write_text(yaml.safe_dump(job))
    ok(run("score", "--config", "capped.yaml", "--model", "models:/adult@champion", "--candidates",
           f"logs/dt={DAYS[4]}", "--date", DAYS[4], "--exposures", "exposures.parquet", "--out", "capped.parquet",
           "--no-track", cwd=base))
    summary = json.loads((base / "capped.parquet.summary.json").read_text())
    assert summary["rules"]["capped"] == summary["rows_in"] == ranked.height and summary["rows_shown"] == 0

    # a rule column named with characters MLflow keys do not take: the ranked file and the run are
    # written (the summary's missing_values.<column> metric failed the job after the file was written)
    (base / "aged").mkdir()
    aged = pl.from_arrow(pq.read_table(next((base / "logs" / f"dt={DAYS[4]}").glob("*.parquet"))))
    aged.with_columns(pl.col("age").cast(pl.Float64).alias("age (years)")).write_parquet(base / "aged" / "part-0.parquet")
    job = yaml.safe_load((base / "job.yaml").read_text())
    job["score"]["new_item"] = {"enabled": True, "column": "age (years)", "max_age_days": 30}
    (base / "aged.yaml").write_text(yaml.safe_dump(job))
    out = ok(run("score", "--config", "aged.yaml", "--model", "models:/adult@champion", "--candidates", "aged",
                 "--date", DAYS[4], "--out", "aged.parquet", cwd=base))
    scored = c.get_run(re.search(r"MLflow run ([0-9a-f]{32})", out).group(1)).data
    assert scored.metrics["missing_values.age _years_"] == 0 and scored.params["score.new_item.column"] == "age (years)"
    assert scored.metrics["rules.boosted_new"] == pl.read_parquet(base / "aged.parquet")["rules"].cast(pl.String).str.contains("boosted_new").sum() > 0

    # the same candidates in two files whose writers disagree on widths (int32 ids and integers in the
    # second): the same lists; ids as strings in one file and integers in the other: one clear line
    day = pq.read_table(next((base / "logs" / f"dt={DAYS[4]}").glob("*.parquet")))
    half = day.num_rows // 2
    for name, second in (("mixed", pa.int32()), ("clash", pa.string())):
        (base / name).mkdir()
        pq.write_table(day.slice(0, half), base / name / "part-0.parquet")
        rest = day.slice(half)
        rest = rest.cast(pa.schema([pa.field(f.name, pa.int32() if f.type == pa.int64() else f.type) for f in rest.schema]))
        pq.write_table(rest.set_column(rest.schema.get_field_index("person_id"), "person_id",
                                       rest["person_id"].cast(second)), base / name / "part-1.parquet")
    ok(run("score", "--config", "job.yaml", "--model", "models:/adult@champion", "--candidates", "mixed",
           "--date", DAYS[4], "--out", "mixed.parquet", "--no-track", cwd=base))
    both = ranked.join(pl.read_parquet(base / "mixed.parquet"), on=["request_id", "person_id"], suffix="_mixed")
    assert both.height == ranked.height and both["person_id"].dtype == pl.Int64
    assert both.filter(pl.col("rank").ne_missing(pl.col("rank_mixed"))).height == 0
    # other chunks through the forward: float32 sums in another order (measured 1.4e-6 relative)
    np.testing.assert_allclose(both["score_mixed"].to_numpy(), both["score"].to_numpy(), rtol=1e-4)
    r = run("score", "--config", "job.yaml", "--model", "models:/adult@champion", "--candidates", "clash",
            "--date", DAYS[4], "--out", "clash.parquet", "--no-track", cwd=base)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "score: 0 rows" in r.stderr, r.stderr   # before the forward
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("mtrank score: error: ") and "part-1.parquet: column 'person_id': rule wrong_type" in err, err
    assert not (base / "clash.parquet").exists()

    out = ok(run("tune-fusion", "--config", "job.yaml", "--model", "models:/adult@champion", "--date", DAYS[4], "--trials", "20", "--json", "tune.json", "--no-track", cwd=base))
    res = json.loads((base / "tune.json").read_text())
    assert res["objective"] == "ndcg" and set(res["search_bounds"]) == {"p_never_married.offset",
                                                                          "p_never_married.exponent"}
    assert res["best"]["tune"]["ndcg"] >= res["start"]["tune"]["ndcg"]
    # no value column in this job: the table shows NDCG only and says why, no rows of nan
    assert "NDCG@10" in out and "value@10: not configured" in out and " nan " not in out and not res["value_configured"]

    job = yaml.safe_load((base / "job.yaml").read_text())         # a gain for a task the model does not have
    job["score"]["tune"]["gains"] = {"high_incom": 2}
    (base / "typo.yaml").write_text(yaml.safe_dump(job))
    r = run("tune-fusion", "--config", "typo.yaml", "--model", "models:/adult@champion", "--date", DAYS[4],
            "--no-track", cwd=base)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("mtrank tune-fusion: error: score.tune.gains: 'high_incom' "
                                                        "is not a binary task of the model")

    job = yaml.safe_load((base / "job.yaml").read_text())         # a factor this model cannot feed
    job["score"]["fusion"] = {"factors": [{"output": "p_ctr"}]}
    (base / "wrong.yaml").write_text(yaml.safe_dump(job))
    r = run("score", "--config", "wrong.yaml", "--model", "models:/adult@champion", "--candidates",
            f"logs/dt={DAYS[4]}", "--date", DAYS[4], "--out", "x.parquet", "--no-track", cwd=base)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'p_ctr'" in r.stderr and "p_high_income" in r.stderr and "p_never_married" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (base / "x.parquet").exists()

    # rule and factor columns that hold the wrong kind of value: one line naming file, column and
    # rule before any forward (they raised Arrow tracebacks after it)
    day = pq.read_table(base / "logs" / f"dt={DAYS[4]}")
    (base / "listy").mkdir()
    genres = pa.array([[w, o] for w, o in zip(day["workclass"].to_pylist(), day["occupation"].to_pylist())])
    pq.write_table(day.append_column("tags", pa.array([[["a"], ["b"]]] * day.num_rows)).append_column("genres", genres),
                   base / "listy" / "part-0.parquet")
    for name, score_cfg, column, what in (
            ("factor", {"fusion": {"factors": [{"output": "p_high_income"}, {"column": "race", "offset": 1.0}]}},
             "race", "must hold numbers (a fusion factor's column; strings are not read as numbers)"),
            ("window", {"window": {"enabled": True, "attribute": "tags", "n": 3}}, "tags",
             "must hold one value per candidate, or a list of values (window.attribute")):
        job = yaml.safe_load((base / "job.yaml").read_text())
        job["score"].update(score_cfg)
        (base / f"{name}.yaml").write_text(yaml.safe_dump(job))
        r = run("score", "--config", f"{name}.yaml", "--model", "models:/adult@champion", "--candidates", "listy",
                "--date", DAYS[4], "--out", "x.parquet", "--no-track", cwd=base)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "score: 0 rows" in r.stderr, r.stderr[-2000:]
        err = r.stderr.strip().splitlines()[-1]
        assert f"part-0.parquet: column '{column}': rule wrong_type: {what}" in err, err
        assert not (base / "x.parquet").exists()
    # a list of values is an attribute: no two of 3 consecutive slots share a workclass or an occupation
    job = yaml.safe_load((base / "job.yaml").read_text())
    job["score"]["window"] = {"enabled": True, "attribute": "genres", "n": 3, "k": 1}
    (base / "genres.yaml").write_text(yaml.safe_dump(job))
    ok(run("score", "--config", "genres.yaml", "--model", "models:/adult@champion", "--candidates", "listy",
           "--date", DAYS[4], "--out", "genres.parquet", "--no-track", cwd=base))
    ranked = pl.read_parquet(base / "genres.parquet").join(pl.from_arrow(day.select(["person_id"]).append_column(
        "genres", genres)), on="person_id").filter(pl.col("rank").is_not_null()).sort("request_id", "rank")
    assert ranked["rules"].cast(pl.Utf8).str.contains("window_deferred").any()
    for lists in ranked.group_by("request_id").agg("genres")["genres"].to_list():
        for t in range(len(lists)):
            held = [v for g in lists[max(0, t - 2):t] for v in set(g) if v is not None]
            assert not {v for v in lists[t] if v is not None} & set(held), lists


RENAMED_COLUMNS = {"click": "tap", "conversion": "buy", "cart": "basket", "collect": "fav",
                   "stay_seconds": "dwell", "user_id": "uid", "item_id": "sku", "request_id": "req"}


def renamed_spec(default_spec: Path) -> dict:
    """The demo spec over renamed columns, with tasks named differently and products left unnamed."""
    d = yaml.safe_load(default_spec.read_text())
    for t in [*d.get("tables", {}).values(), *d["features"]]:
        if "buckets" in t:
            t["buckets"] = min(t["buckets"], 4096)
    for f in d["features"]:
        f["name"] = RENAMED_COLUMNS.get(f["name"], f["name"])
    names = {"ctr": "tapped", "cvr": "bought", "stay": "dwell_time", "collect": "faved", "cart": "basketed"}
    tasks = []
    for t in d["tasks"]:
        t = {**t, "name": names[t["name"]], "label": RENAMED_COLUMNS.get(t["label"], t["label"])}
        for k in ("space", "parent"):
            if t.get(k) in names:
                t[k] = names[t[k]]
        t.pop("product", None)
        tasks.append(t)
    d.update(tasks=tasks, ground_truth={}, group_key="uid", request_id="req", timestamp=None)
    return d


@pytest.mark.slow
def test_renamed_generated_logs_through_the_cli(tmp_path):
    from tests.conftest import DEFAULT_SPEC

    generate_demo_logs(tmp_path / "gen", days=3, rows=6000, seed=3, users=800, items=400)
    for f in sorted((tmp_path / "gen").rglob("*.parquet")):
        t = pl.read_parquet(f)
        t = t.drop([c for c in t.columns if c.startswith("true_")] + ["ts"]).rename(
            {k: v for k, v in RENAMED_COLUMNS.items() if k in t.columns})
        dst = tmp_path / "logs" / f.relative_to(tmp_path / "gen")
        dst.parent.mkdir(parents=True, exist_ok=True)
        t.write_parquet(dst)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(renamed_spec(DEFAULT_SPEC)))
    factors = [{"output": "p_tapped"}, {"output": "p_bought", "offset": 0.05},
               {"column": "price", "offset": 1.0, "search": {"offset": {"lo": 0.1, "hi": 100.0}}},
               {"output": "dwell_time", "exponent": 0.2}, {"output": "p_tapped_basketed", "exponent": 0.1}]
    job = {"name": "renamed", "data": "logs", "spec": "spec.yaml", "window_days": 2, "work_dir": "work",
           "model": SMALL_MODEL, "train": TRAIN,
           "score": {**NO_RULES, "item_column": "sku", "list_size": 20, "fusion": {"factors": factors},
                     "on_bad_row": "quarantine",      # logged requests repeat an item now and then
                     "tune": {"value_column": "price", "value_task": "bought"}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    ok(run("validate", "--data", "logs", "--spec", "spec.yaml", cwd=tmp_path))
    out = ok(run("daily", "--config", "job.yaml", "--date", "2026-11-03", cwd=tmp_path))
    assert "v1: champion" in out
    metrics = json.loads((tmp_path / "work" / "runs" / "renamed" / "2026-11-03" / "metrics.json").read_text())
    assert {"tapped", "bought", "tapped_bought", "dwell_time", "faved", "tapped_faved", "basketed",
            "tapped_basketed"} == set(metrics["tasks"])
    assert "gauc" in metrics["tasks"]["tapped"]               # group_key uid: GAUC reported
    out = ok(run("score", "--config", "job.yaml", "--model", "models:/renamed@champion", "--candidates",
                 "logs/dt=2026-11-03", "--date", "2026-11-03", "--out", "ranked.parquet", "--no-track",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}", cwd=tmp_path))
    ranked = pl.read_parquet(tmp_path / "ranked.parquet")
    assert {"factor_p_tapped", "factor_price", "factor_dwell_time", "factor_p_tapped_basketed"} <= set(ranked.columns)
    out = ok(run("tune-fusion", "--config", "job.yaml", "--model", "models:/renamed@champion", "--data", "logs",
                 "--date", "2026-11-03", "--trials", "12", "--json", "tune.json", "--no-track",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}", cwd=tmp_path))
    res = json.loads((tmp_path / "tune.json").read_text())
    assert res["objective"] == "value" and list(res["search_bounds"]) == ["price.offset"]
    assert res["best"]["tune"]["value"] >= res["start"]["tune"]["value"] > 0


def test_no_demo_task_name_in_pipeline_or_jobs_code():
    """Task and output names come from the spec: no quoted demo name in pipeline/ or jobs/ Python
    (the generator, which writes the demo's logs, excepted)."""
    root = Path(__file__).parents[1]
    demo = r"""["'](p_)?(ctr|cvr|ctcvr|ctcollect|ctcart|collect|cart|stay|click|conversion)["']"""
    hits = []
    for f in [*(root / "pipeline").rglob("*.py"), *(root / "jobs").rglob("*.py")]:
        if "synthetic" in f.parts:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(demo, line):
                hits.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
