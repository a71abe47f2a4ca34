"""`mtrank init-spec`: a FeatureSpec proposed from real Parquet logs loads strictly and validates them."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mtrank.features.infer_spec import bucket_count, expected_collision_rate, expected_lost_rate
from mtrank.features.spec import CategoricalFeature, MultiHotFeature, NumericFeature, load_spec

MTRANK = [sys.executable, "-m", "mtrank.jobs.cli"]
ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult.parquet"
DAYS = ("2024-03-01", "2024-03-02", "2024-03-03")


def mtrank(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MTRANK, *map(str, args)], capture_output=True, text=True)


def mtrank_here(capsys, *args) -> tuple[int, str, str]:
    """The same CLI entry point in this process: no interpreter start (init-spec itself runs in a subprocess)."""
    from mtrank.jobs.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def adult(tmp_path_factory):
    """UCI Adult as three day partitions, with 0/1 labels derived from its string columns."""
    if not ADULT.exists():
        pytest.skip(f"{ADULT} not present")
    base = tmp_path_factory.mktemp("adult")
    df = pl.read_parquet(ADULT).with_columns(
        high_income=(pl.col("income") == ">50K").cast(pl.Int8),
        never_married=(pl.col("marital-status") == "Never-married").cast(pl.Int8))
    n = df.height
    for i, day in enumerate(DAYS):
        part = base / "logs" / f"dt={day}"
        part.mkdir(parents=True)
        df.slice(i * n // 3, (i + 1) * n // 3 - i * n // 3).write_parquet(part / "part-00000.parquet")
    spec = base / "spec.yaml"
    r = mtrank("init-spec", "--data", base / "logs", "--label", "high_income", "--label", "never_married",
               "--exclude", "income", "--out", spec)
    assert r.returncode == 0, r.stderr
    return base, spec, r


def test_adult_spec_loads_with_expected_kinds_and_validates(adult, capsys):
    base, path, r = adult
    assert "2 task(s)" in r.stdout and str(path) in r.stdout
    text = path.read_text()
    assert text.startswith("# FeatureSpec proposed by `mtrank init-spec`") and "48,842 rows" in text
    spec = load_spec(path)                       # strict: unknown keys, bad kinds etc. would raise
    by = spec.feature_by_name
    for c in ("age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"):
        assert isinstance(by[c], NumericFeature) and by[c].standardize and by[c].clip is not None, c
        assert by[c].fill is None, c             # Adult has no nulls: no fill proposed
    assert by["capital-gain"].log1p and not by["age"].log1p
    assert by["age"].clip[0] >= 17 and by["age"].clip[1] <= 90
    for c in ("workclass", "education", "marital-status", "occupation", "relationship", "race", "gender",
              "native-country"):
        assert isinstance(by[c], CategoricalFeature), c
    assert by["workclass"].buckets == 1024                   # 9 values / 0.01 -> 901 -> 1024
    assert by["native-country"].buckets == 8192              # 42 values -> 4201 -> 8192
    assert {"income", "high_income", "never_married"}.isdisjoint(by)
    assert [(t.name, t.label, t.type, t.space, t.parent) for t in spec.tasks] == [
        ("high_income", "high_income", "binary", "all", None),
        ("never_married", "never_married", "binary", "all", None)]
    assert (spec.group_key, spec.request_id, spec.timestamp) == (None, None, None)
    # every feature carries its statistics in a comment right above it
    assert "# age: " in text and "distinct" in text and "expected 0.78% of values share an id" in text
    assert "missing markers" in text                         # Adult's '?' in workclass / occupation
    rc, out, err = mtrank_here(capsys, "validate", "--data", base / "logs", "--spec", path)
    assert rc == 0, err
    assert "rows read 48,842 = accepted 48,842 + rejected 0" in out


def test_existing_out_is_not_overwritten(adult, capsys):
    base, path, _ = adult
    before = path.read_text()
    rc, out, err = mtrank_here(capsys, "init-spec", "--data", base / "logs", "--label", "high_income", "--out", path)
    assert rc == 2 and out == ""
    line = one_line(err)
    assert str(path) in line and "--force" in line
    assert path.read_text() == before
    rc, out, _ = mtrank_here(capsys, "init-spec", "--data", base / "logs", "--label", "high_income", "--exclude",
                             "income", "--out", path, "--force")
    assert rc == 0 and "1 task(s)" in out and "never_married" not in path.read_text().split("tasks:")[1]
    path.write_text(before)


def test_missing_label_fails_in_one_line_naming_it(adult, capsys):
    base, _, _ = adult
    rc, out, err = mtrank_here(capsys, "init-spec", "--data", base / "logs", "--label", "high_income",
                               "--label", "no_such_label")
    assert rc == 2 and out == ""
    line = one_line(err)
    assert line.startswith("mtrank init-spec: error: ")
    assert "'no_such_label'" in line and "missing_column" in line and "part-00000.parquet" in line


def test_a_label_named_with_other_characters_gets_a_task_name_mlflow_takes(adult, tmp_path, capsys):
    """A label column `rich?` (MLflow metric names take no '?'): the task is named `rich_`, its label
    stays `rich?`, and the spec validates; the daily job's metrics then log (a spec naming the
    task `rich?` fails at load: tests/test_spec.py)."""
    base, _, _ = adult
    logs = tmp_path / "logs"
    for part in sorted((base / "logs").iterdir()):
        (logs / part.name).mkdir(parents=True)
        pl.read_parquet(part / "part-00000.parquet").rename({"high_income": "rich?"}) \
            .write_parquet(logs / part.name / "part-00000.parquet")
    rc, out, err = mtrank_here(capsys, "init-spec", "--data", logs, "--label", "rich?", "--exclude", "income",
                               "--out", tmp_path / "spec.yaml")
    assert rc == 0, err
    spec = load_spec(str(tmp_path / "spec.yaml"))
    assert [(t.name, t.label) for t in spec.tasks] == [("rich_", "rich?")]
    rc, out, err = mtrank_here(capsys, "validate", "--data", logs, "--spec", tmp_path / "spec.yaml")
    assert rc == 0, err


def test_string_label_fails_naming_column_and_rule(adult, capsys):
    base, _, _ = adult
    rc, out, err = mtrank_here(capsys, "init-spec", "--data", base / "logs", "--label", "income")
    assert rc == 2 and out == ""
    line = one_line(err)
    assert "'income'" in line and "wrong_type" in line and "0/1" in line and "dt=2024-03-01" in line


def test_generated_logs_propose_post_click_tasks(tmp_path, capsys):
    logs = tmp_path / "logs"
    rc, _, err = mtrank_here(capsys, "generate", "--out", logs, "--days", 2, "--rows-per-day", 2000, "--seed", 1,
                             "--users", 500, "--items", 300)
    assert rc == 0, err
    path = tmp_path / "spec.yaml"
    r = mtrank("init-spec", "--data", logs, "--label", "click", "--label", "conversion", "--label", "cart",
               "--group-key", "user_id", "--out", path)
    assert r.returncode == 0, r.stderr
    spec = load_spec(path)
    t = spec.task_by_name
    assert (t["click"].space, t["click"].parent) == ("all", None)
    for child in ("conversion", "cart"):
        assert (t[child].type, t[child].space, t[child].parent) == ("binary", "click", "click"), child
    by = spec.feature_by_name
    assert isinstance(by["item_tags"], MultiHotFeature) and isinstance(by["user_recent_categories"], MultiHotFeature)
    assert isinstance(by["user_id"], CategoricalFeature) and isinstance(by["category_id"], CategoricalFeature)
    assert isinstance(by["price"], NumericFeature) and by["price"].log1p
    assert isinstance(by["user_gender"], CategoricalFeature)
    # the logged slot: hashed, and served at the top slot the logs show (position bias learnt in training only)
    assert isinstance(by["position"], CategoricalFeature) and spec.served_values == {"position": 0}
    assert "position" not in spec.serving_columns
    # never inputs: labels, post-click outcomes, the generator's truth, the request id and the time
    for c in ("click", "conversion", "cart", "collect", "stay_seconds", "true_p_click", "true_p_collect",
              "true_stay_seconds", "request_id", "ts"):
        assert c not in by, c
    assert spec.ground_truth == {"click": "true_p_click", "conversion": "true_p_conversion", "cart": "true_p_cart"}
    assert (spec.group_key, spec.request_id, spec.timestamp) == ("user_id", "request_id", "ts")
    rc, out, err = mtrank_here(capsys, "validate", "--data", logs, "--spec", path)
    assert rc == 0, err
    assert "rows read 4,000 = accepted 4,000 + rejected 0" in out


def test_bucket_sizing_rule():
    assert bucket_count(0) == 16 and bucket_count(1) == 128          # 1 / 0.01 + 1 = 101 -> 128
    assert bucket_count(9) == 1024 and bucket_count(10) == 1024      # 1001 -> 1024
    assert bucket_count(11) == 2048                                  # 1101 -> 2048
    assert bucket_count(10_000, 0.01) == 1 << 20
    assert bucket_count(10_000, 0.01, maximum=1 << 16) == 1 << 16    # the cap wins
    assert bucket_count(3, 0.5) == 16                                # the minimum
    for n in (1, 2, 5, 9, 42, 100, 1_000, 9_999):
        b = bucket_count(n, 0.01)
        assert b & (b - 1) == 0 and b > 1
        assert expected_collision_rate(n, b) <= 0.01 and n / (b - 1) <= 0.01
        assert bucket_count(n, 0.01) >= bucket_count(n - 1, 0.01)
        assert b // 2 - 1 < n / 0.01 or b == 16                       # the smallest power of two that fits
    with pytest.raises(ValueError):
        bucket_count(10, 0.0)
    # the formulas against a simulation: 500 values hashed uniformly into 2047 ids
    rng = np.random.default_rng(0)
    n, b = 500, 2048
    shared, lost = [], []
    for _ in range(200):
        ids = rng.integers(1, b, n)
        _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        shared.append(np.mean(counts[inverse] > 1))
        lost.append(1 - len(counts) / n)
    assert abs(np.mean(shared) - expected_collision_rate(n, b)) < 0.01
    assert abs(np.mean(lost) - expected_lost_rate(n, b)) < 0.005


def test_a_request_id_named_categorical_stays_a_feature(tmp_path, capsys):
    """Lists grouped by user (`--request-id user_id`): the user id is no feature by default, but an
    explicit `--categorical user_id` keeps it one instead of being overruled in silence."""
    logs = tmp_path / "logs"
    rc, _, err = mtrank_here(capsys, "generate", "--out", logs, "--days", 1, "--rows-per-day", 1000, "--seed", 2,
                             "--users", 200, "--items", 100)
    assert rc == 0, err
    for forced, path in ((False, tmp_path / "plain.yaml"), (True, tmp_path / "forced.yaml")):
        extra = ["--categorical", "user_id"] if forced else []
        rc, _, err = mtrank_here(capsys, "init-spec", "--data", logs, "--label", "click", "--request-id", "user_id",
                                 *extra, "--out", path)
        assert rc == 0, err
        spec = load_spec(path)
        assert spec.request_id == "user_id"
        assert ("user_id" in spec.feature_by_name) is forced
        assert not forced or isinstance(spec.feature_by_name["user_id"], CategoricalFeature)
        text = path.read_text()
        assert forced or "#   user_id: request id (--categorical also hashes it" in text, text[-800:]
    rc, out, err = mtrank_here(capsys, "validate", "--data", logs, "--spec", tmp_path / "forced.yaml")
    assert rc == 0, err
