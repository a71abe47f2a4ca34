"""The `mtrank` command as a user runs it: real processes, real Parquet, exit codes and messages."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

MTRANK = [sys.executable, "-m", "mtrank.jobs.cli"]
SMALL = ["--users", "5000", "--items", "3000"]


def mtrank(*args, check=True, cwd=None):
    r = subprocess.run([*MTRANK, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"mtrank {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "logs"
    r = mtrank("generate", "--out", root, "--days", 2, "--rows-per-day", 3000, "--seed", 3, *SMALL,
               "--start", "2026-11-01")
    assert "wrote 6,000 rows" in r.stdout
    return root


def test_generate_then_validate_balances(logs, tmp_path):
    out = tmp_path / "report.json"
    r = mtrank("validate", "--data", logs, "--json", out)
    assert "rows read 6,000 = accepted 6,000 + rejected 0" in r.stdout and "balanced" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["accounting"]["balanced"] and rep["window"]["files"] == 2
    coll = rep["collisions"]
    assert set(coll) >= {"user_id", "item_id", "category"} and 0 <= coll["user_id"]["collision_rate"] < 0.05
    r = mtrank("validate", "--data", logs, "--from", "2026-11-02", "--to", "2026-11-02", "--no-collisions")
    assert "rows read 3,000" in r.stdout


def _corrupt_copy(logs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(logs, bad)
    f = bad / "dt=2026-11-02" / "part-00000.parquet"
    df = pl.read_parquet(f)
    unclicked = df.height - 1 - df["click"].reverse().arg_min()  # away from the NaN-price rows
    df = df.with_columns(pl.when(pl.int_range(df.height) == unclicked).then(1).otherwise(pl.col("conversion"))
                         .cast(pl.Int8).alias("conversion"),
                         pl.when(pl.int_range(df.height) < 3).then(float("nan")).otherwise(pl.col("price"))
                         .alias("price"))
    df.write_parquet(f)
    return bad, f


def test_bad_rows_fail_with_file_column_rule(logs, tmp_path):
    bad, f = _corrupt_copy(logs, tmp_path)
    r = mtrank("validate", "--data", bad, check=False)
    assert r.returncode == 2
    assert str(f) in r.stderr and "column 'price': rule non_finite (3 rows)" in r.stderr
    assert "1 other problem(s)" in r.stderr


def test_bad_rows_quarantined_and_counted(logs, tmp_path):
    bad, _ = _corrupt_copy(logs, tmp_path)
    q = tmp_path / "q"
    r = mtrank("validate", "--data", bad, "--on-bad-row", "quarantine", "--quarantine-dir", q,
               "--json", tmp_path / "r.json")
    assert "rows read 6,000 = accepted 5,996 + rejected 4" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())["accounting"]
    assert rep["rejected_by_reason"] == {"conversion:outside_space": 1, "price:non_finite": 3}
    assert pl.read_parquet(sorted(Path(q).rglob("*.parquet"))).height == 4


def test_spec_errors_and_missing_data_are_clear(tmp_path, logs):
    spec = tmp_path / "spec.yaml"
    spec.write_text(Path("features/default_spec.yaml").read_text().replace("on_bad_row: fail", "on_bad_rows: fail"))
    r = mtrank("validate", "--data", logs, "--spec", spec, check=False)
    assert r.returncode == 2 and "on_bad_rows: unknown key" in r.stderr
    r = mtrank("validate", "--data", tmp_path / "nowhere", check=False)
    assert r.returncode == 2 and "data directory does not exist" in r.stderr
    r = mtrank("validate", "--data", logs, "--from", "2026-10-30", "--to", "2026-11-01", check=False)
    assert r.returncode == 2 and "dt=2026-10-30" in r.stderr and "missing_partition" in r.stderr


def test_version_and_no_abbreviated_flags():
    r = subprocess.run([*MTRANK, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("mtrank ")
    r = subprocess.run([*MTRANK, "validate", "--dat", "x"], capture_output=True, text=True)   # not --data
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_every_flag_has_help_and_shows_its_default():
    import argparse

    from mtrank.jobs.cli import build_parser

    parser = build_parser()
    (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subs.choices.items():
        helptext = sub.format_help()
        for a in sub._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            assert a.help, f"mtrank {name} {a.option_strings}: no help"
            if a.default not in (None, False) and a.option_strings:
                assert "default" in sub._get_formatter()._get_help_string(a).lower(), (name, a.option_strings)
        assert "default" in helptext


@pytest.mark.parametrize("args", [
    ["evaluate", "--model", "models:/nobody@champion", "--data", "LOGS", "--date", "2026-11-02"],
    ["score", "--model", "models:/nobody@champion", "--candidates", "LOGS", "--date", "2026-11-02", "--out", "o.parquet"],
    ["score", "--model", "some/model/dir", "--candidates", "LOGS", "--date", "2026-11-02", "--out", "o.parquet"],
    ["tune-fusion", "--model", "models:/nobody@champion", "--data", "LOGS", "--date", "2026-11-02"],
    ["lineage"],
    ["promote", "--date", "2026-11-02"],
])
def test_commands_that_read_a_store_never_create_one(args, logs, tmp_path):
    """Run where no job has trained: one line naming where it looked and how to point it elsewhere,
    exit 2, and nothing written in the working directory (no ./mlflow.db, no ./.mtrank)."""
    r = mtrank(*[str(logs) if a == "LOGS" else a for a in args], check=False, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "MLflow store" in lines[0] and "--config" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
