"""Hostile or careless inputs that used to end in a traceback or be accepted silently: each is now
one clear line with exit 2, or a count in the output. Real files, real CLI processes."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.conftest import mtrank_in_process, write_job

pytestmark = pytest.mark.slow   # end-to-end: trains models, starts servers or ranks

DATE = "2026-11-03"
TRAIN = {"batch_size": 1024, "epochs": 1}


def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command's error paths, run by `main()` in this process (tests/test_cli.py and the fault
    tests start real processes)."""
    return mtrank_in_process(*args, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and len([e for e in err if "error:" in e]) == 1, r.stderr
    line = next(e for e in err if "error:" in e)
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def base(tmp_path_factory, ranker):
    """The shared trained ranker (logs, spec, its run directory), a scoring config and candidates."""
    base = tmp_path_factory.mktemp("redteam")
    for d in ("logs", "work", "spec.yaml"):
        (base / d).symlink_to(ranker / d)
    write_job(base / "job.yaml", "ranker", TRAIN, score={"list_size": 10})
    r = run("generate", "--candidates", "--out", base / "cand", "--date", DATE, "--requests", 40,
            "--per-request", 20, "--seed", 2, "--users", 2000, "--items", 800)
    assert r.returncode == 0, r.stderr
    return base


def model_dir(base: Path) -> Path:
    return base / "work" / "runs" / "ranker" / DATE / "model"


def score(base: Path, *extra, model=None, candidates=None):
    return run("score", "--config", base / "job.yaml", "--model", model or model_dir(base), "--candidates",
               candidates or base / "cand", "--date", DATE, "--out", base / "out" / "ranked.parquet", "--no-track",
               *extra)


class Payload:
    """Not a tensor: a file holding it must never be unpickled."""


def test_pickled_objects_in_weights_and_checkpoints_are_refused(base, tmp_path):
    evil = tmp_path / "model"
    shutil.copytree(model_dir(base), evil)
    torch.save({"state": Payload()}, evil / "weights.pt")
    one_line_error(score(base, model=evil), "weights.pt", "refused to load", "pickled")
    r = run("evaluate", "--model", evil, "--data", base / "logs", "--date", DATE, "--out", tmp_path / "rep")
    one_line_error(r, "weights.pt", "refused to load")

    work = tmp_path / "work"          # a resume from a checkpoint that holds a pickled object
    shutil.copytree(base / "work" / "runs", work / "runs")
    ckpt = work / "runs" / "ranker" / DATE / "checkpoints"
    manifest = json.loads((ckpt / "latest.json").read_text())
    last = ckpt / manifest["checkpoints"][-1]["file"]
    torch.save({"x": Payload()}, last)
    from mtrank.pipeline.output_files import sha256

    manifest["checkpoints"][-1]["sha256"] = sha256(last)
    (ckpt / "latest.json").write_text(json.dumps(manifest))
    job = yaml.safe_load((base / "job.yaml").read_text())
    job.update(work_dir=str(work), data=str(base / "logs"), spec=str(base / "spec.yaml"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    one_line_error(run("train", "--config", tmp_path / "job.yaml", "--date", DATE, "--resume", "--no-track"),
                   "refused to load")


def _exposures(path: Path, items, counts, day=DATE, count_type=pa.int64()) -> Path:
    pq.write_table(pa.table({"item_id": pa.array(items, pa.int64()), "dt": pa.array([day] * len(items)),
                             "exposures": pa.array(counts, count_type)}), path)
    return path


def test_bad_exposures_files_are_clear_errors(base, tmp_path):
    items = pq.read_table(base / "cand", columns=["item_id"])["item_id"].to_pylist()[:3]
    bad_type = _exposures(tmp_path / "str.parquet", items, ["1", "2", "3"], count_type=pa.string())
    one_line_error(score(base, "--exposures", bad_type), "'exposures'", "wrong_type")
    negative = _exposures(tmp_path / "neg.parquet", items, [5, -100, 1])
    one_line_error(score(base, "--exposures", negative), "'exposures'", "rule negative", "(1 rows)")
    null_id = _exposures(tmp_path / "null.parquet", [items[0], None, items[2]], [1, 2, 3])
    one_line_error(score(base, "--exposures", null_id), "'item_id'", "rule null")


def test_duplicate_exposure_items_are_summed_and_said(base, tmp_path):
    item = pq.read_table(base / "cand", columns=["item_id"])["item_id"][0].as_py()
    dup = _exposures(tmp_path / "dup.parquet", [item, item], [3, 4])
    r = score(base, "--exposures", dup)
    assert r.returncode == 0, r.stderr
    assert "1 rows repeat an item; their exposures are summed" in r.stderr


def test_candidate_time_of_the_wrong_type_and_missing_rule_values(base, tmp_path):
    t = pl.read_parquet(base / "cand")
    bad = tmp_path / "cand_bad_ts"
    bad.mkdir()
    t.with_columns(pl.col("ts").cast(pl.String)).write_parquet(bad / "part.parquet")
    one_line_error(score(base, candidates=bad), "'ts'", "wrong_type")

    holes = tmp_path / "cand_holes"
    holes.mkdir()
    n = t.height
    t.with_columns(quality_score=pl.Series([float("nan")] * 7 + [0.9] * (n - 7)),
                   ts=pl.when(pl.int_range(0, n) < 5).then(None).otherwise(pl.col("ts")),
                   in_campaign=pl.when(pl.int_range(0, n) < 3).then(None).otherwise(pl.col("in_campaign"))) \
        .write_parquet(holes / "part.parquet")
    r = score(base, candidates=holes)
    assert r.returncode == 0, r.stderr
    summary = json.loads((base / "out" / "ranked.parquet.summary.json").read_text())
    assert summary["missing_values"] == {"ts": 5, "item_age_days": 0, "in_campaign": 3, "quality_score": 7}
    assert "missing values" in r.stdout and "quality_score 7" in r.stdout


def test_boolean_numbers_in_a_job_config_are_errors(base, tmp_path):
    write_job(tmp_path / "job.yaml", "ranker", {**TRAIN, "batch_size": True}, data=str(base / "logs"),
              spec=str(base / "spec.yaml"), work_dir=str(tmp_path / "work"))
    one_line_error(run("train", "--config", tmp_path / "job.yaml", "--date", DATE, "--no-track"),
                   "batch_size", "boolean")


def test_a_window_without_positives_or_with_a_handful_of_rows_names_the_task(base, tmp_path):
    logs = tmp_path / "logs"
    for f in sorted((base / "logs").rglob("*.parquet")):
        dst = logs / f.relative_to(base / "logs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        pl.read_parquet(f).with_columns(cart=pl.lit(0, pl.Int8)).write_parquet(dst)
    write_job(tmp_path / "job.yaml", "ranker", TRAIN, data=str(logs), spec=str(base / "spec.yaml"),
              work_dir=str(tmp_path / "work"))
    one_line_error(run("train", "--config", tmp_path / "job.yaml", "--date", DATE, "--no-track"),
                   "'cart'", "one_class", "task 'cart' has no positive")
    write_job(tmp_path / "few.yaml", "ranker", {**TRAIN, "min_rows": 100_000}, data=str(base / "logs"),
              spec=str(base / "spec.yaml"), work_dir=str(tmp_path / "work2"))
    one_line_error(run("train", "--config", tmp_path / "few.yaml", "--date", DATE, "--no-track"),
                   "too_few_rows", "train.min_rows")


def test_undefined_metrics_are_null_in_strict_json(base, tmp_path):
    """An evaluation day on which one task has no positive: its AUC is null, the file parses as
    strict JSON, and one warning names it."""
    logs = tmp_path / "logs"
    shutil.copytree(base / "logs", logs)
    for f in (logs / f"dt={DATE}").glob("*.parquet"):
        pl.read_parquet(f).with_columns(collect=pl.lit(0, pl.Int8)).write_parquet(f)
    write_job(tmp_path / "job.yaml", "ranker", TRAIN, data=str(logs), spec=str(base / "spec.yaml"),
              work_dir=str(tmp_path / "work"))
    r = run("train", "--config", tmp_path / "job.yaml", "--date", DATE, "--no-track")
    assert r.returncode == 0, r.stderr
    assert "undefined on 2026-11-03" in r.stderr and "collect.auc" in r.stderr
    assert "RuntimeWarning" not in r.stderr and "UserWarning" not in r.stderr   # one warning, ours

    def strict(c):
        raise ValueError(f"non-standard JSON constant {c}")

    out = tmp_path / "work" / "runs" / "ranker" / DATE
    for path in (out / "metrics.json", out / "report" / "metrics.json"):
        doc = json.loads(path.read_text(), parse_constant=strict)
    tasks = json.loads((out / "metrics.json").read_text())["tasks"]
    assert tasks["collect"]["auc"] is None and tasks["ctr"]["auc"] is not None and math.isfinite(tasks["ctr"]["auc"])
    assert doc is not None


def test_promote_without_a_challenger_is_one_line(tmp_path, ranker):
    write_job(tmp_path / "job.yaml", "nothing-yet", TRAIN, data=str(tmp_path / "logs"), work_dir=str(tmp_path / "w"))
    one_line_error(run("promote", "--config", tmp_path / "job.yaml", "--date", DATE), "no MLflow store")
    assert not (tmp_path / "w").exists()   # nothing created where nothing was trained
    # a store that exists but has no challenger of this name
    uri = f"sqlite:///{ranker / 'work' / 'mlflow.db'}"
    one_line_error(run("promote", "--config", tmp_path / "job.yaml", "--date", DATE, "--tracking-uri", uri),
                   "no 'challenger' version")


def test_quarantine_spec_without_a_directory_is_a_clear_error(base):
    from mtrank.features.base import MtrankError
    from mtrank.features.spec import load_spec
    from mtrank.pipeline.dataset import open_window
    from mtrank.pipeline.reader import ImpressionReader

    spec = load_spec(base / "spec.yaml").model_copy(update={"on_bad_row": "quarantine"})
    window = open_window(base / "logs", spec)
    with pytest.raises(MtrankError, match="on_bad_row: quarantine.*quarantine directory"):
        ImpressionReader(window, spec, quarantine_dir=None)
    assert np.isfinite(window.rows)


def test_validate_counts_exact_duplicate_impressions(base, tmp_path):
    logs = tmp_path / "logs"
    for f in sorted((base / "logs").rglob("*.parquet")):
        dst = logs / f.relative_to(base / "logs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        t = pl.read_parquet(f)
        (pl.concat([t, t.head(3)]) if f.parent.name == f"dt={DATE}" else t).write_parquet(dst)
    r = run("validate", "--data", logs, "--spec", base / "spec.yaml", "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "v.json").read_text())["duplicate_rows"] == 3
    assert "exact duplicate rows (copies of an earlier row; kept; the spec's duplicate_rows: reject drops them): 3" \
        in r.stdout


def test_a_diverged_model_fails_clearly_instead_of_registering(base, tmp_path):
    """lr 1e6 used to end with AUC 0.500 everywhere, stay RMSE inf and exit 0."""
    write_job(tmp_path / "job.yaml", "ranker", {**TRAIN, "lr": 1e6, "sparse_lr": 1e6},
              data=str(base / "logs"), spec=str(base / "spec.yaml"), work_dir=str(tmp_path / "work"))
    r = run("train", "--config", tmp_path / "job.yaml", "--date", DATE)
    line = one_line_error(r)
    assert "cannot rank" in line or "non-finite loss" in line, line
    assert not (tmp_path / "work" / "runs" / "ranker" / DATE / "model").exists()


def test_tune_fusion_refuses_rows_without_a_request_id(base, tmp_path):
    """Rows a stage groups by request must have a request id: null ids used to form one giant request."""
    logs = tmp_path / "logs"
    shutil.copytree(base / "logs", logs)
    for f in (logs / f"dt={DATE}").glob("*.parquet"):
        t = pl.read_parquet(f)
        t.with_columns(request_id=pl.when(pl.int_range(0, t.height) < 4).then(None)
                       .otherwise(pl.col("request_id"))).write_parquet(f)
    demo = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "default_job.yaml").read_text())
    write_job(tmp_path / "job.yaml", "ranker", TRAIN, data=str(logs), spec=str(base / "spec.yaml"),
              work_dir=str(tmp_path / "work"), score={"fusion": demo["score"]["fusion"], "tune": demo["score"]["tune"]})
    r = run("tune-fusion", "--config", tmp_path / "job.yaml", "--model", model_dir(base), "--data", logs, "--date",
            DATE, "--trials", 3, "--no-track")
    one_line_error(r, "'request_id'", "rule null", "(4 rows)")


def test_a_log_timestamp_of_another_type_is_named(base, tmp_path):
    logs = tmp_path / "logs"
    for f in sorted((base / "logs").rglob("*.parquet")):
        dst = logs / f.relative_to(base / "logs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        pl.read_parquet(f).with_columns(pl.col("ts").cast(pl.String)).write_parquet(dst)
    one_line_error(run("validate", "--data", logs, "--spec", base / "spec.yaml"), "'ts'", "wrong_type", "timestamp")


def test_duplicate_rows_can_be_rejected_and_counted(base, tmp_path):
    """`duplicate_rows: reject`: every copy of an earlier row (within a file or across days) is
    dropped and counted, the first copy stays, and the accounting balances."""
    from mtrank.features.spec import load_spec
    from mtrank.pipeline.dataset import open_window
    from mtrank.pipeline.reader import DUPLICATE_ROW, ImpressionReader

    logs = tmp_path / "logs"
    files = sorted((base / "logs").rglob("*.parquet"))
    first = pl.read_parquet(files[0])
    for f in files:
        dst = logs / f.relative_to(base / "logs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        t = pl.read_parquet(f)
        if f == files[0]:
            t = pl.concat([t, t.slice(10, 4)])           # 4 copies inside the file
        elif f == files[-1]:
            t = pl.concat([t, first.slice(100, 3)])       # 3 copies of another day's rows
        t.write_parquet(dst)
    spec = load_spec(base / "spec.yaml")
    for mode, expected in (("keep", 0), ("reject", 7)):
        s = spec.model_copy(update={"duplicate_rows": mode})
        window = open_window(logs, s)
        reader = ImpressionReader(window, s, shuffle=True, seed=3)
        accepted = sum(rb.num_rows for rb in reader.frames())
        acc = reader.accounting
        assert acc.rejected.get(DUPLICATE_ROW, 0) == expected
        assert acc.rows_read == window.rows == accepted + acc.rows_rejected
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.model_copy(update={"duplicate_rows": "reject"}).to_yaml())
    r = run("validate", "--data", logs, "--spec", spec_file)
    assert r.returncode == 0, r.stderr
    assert "row:duplicate_row" in r.stdout
    assert "exact duplicate rows (copies of an earlier row; rejected: duplicate_rows: reject): 7" in r.stdout


def test_mistyped_model_references_are_one_line_naming_what_exists(base, tmp_path):
    uri = f"sqlite:///{(base / 'work' / 'mlflow.db').resolve()}"
    r = run("score", "--config", base / "job.yaml", "--model", "models:/ranker@champoin", "--tracking-uri", uri,
            "--candidates", base / "cand", "--date", DATE, "--out", tmp_path / "x.parquet", "--no-track")
    one_line_error(r, "models:/ranker@champoin", "alias champoin not found", "aliases challenger, champion")
    r = run("lineage", "--config", base / "job.yaml", "--version", "99")
    one_line_error(r, "models:/ranker/99", "version=99", "has versions 1")
    assert not (tmp_path / "x.parquet").exists()
