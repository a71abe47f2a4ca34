"""Logs and outputs on S3, against a real S3 API: moto's server on 127.0.0.1 in its own process.

Nothing of mtrank is mocked: the CLI runs as a subprocess with AWS_ENDPOINT_URL pointing at the
server, reads and writes through pyarrow's S3 filesystem (and polars' object store), and every
figure is compared with the same command on a local copy of the same files. The MLflow artifact
store of a registered model is the bucket too (MLflow's boto3 client, MLFLOW_S3_ENDPOINT_URL).
"""
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import MTRANK, make_frame, small_spec, write_job

BUCKET = "mtrank-test"
DATE = "2026-11-03"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """The running server: its endpoint, a boto3 client, and the environment for mtrank processes."""

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}, **KEYS,
                    "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                                    region="us-east-1", access_key="testing", secret_key="testing")

    def upload(self, local, prefix: str) -> str:
        for f in sorted(local.rglob("*.parquet")):
            self.client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(local).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    def read_table(self, key: str) -> pa.Table:
        return pq.read_table(f"{BUCKET}/{key}", filesystem=self.fs)

    def read_json(self, key: str) -> dict:
        return json.loads(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def run(self, *args, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run([*MTRANK, *map(str, args)], capture_output=True, text=True, env=self.env, cwd=cwd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = S3(f"http://127.0.0.1:{port}")
        for _ in range(600):   # answers within seconds; the bound is for a loaded machine
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}")
            try:
                server.client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        server.client.create_bucket(Bucket=BUCKET)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- fast: the storage module itself against the server ------------------------------------------
def test_storage_reads_lists_and_writes_objects(s3, spec, tmp_path, monkeypatch):
    from mtrank.features import storage
    from mtrank.features.infer_spec import InferOptions, infer_spec
    from mtrank.features.rules import BadInputError
    from mtrank.jobs.exposures import count_exposures
    from mtrank.pipeline.output_files import OutputError, write_output
    from mtrank.pipeline.dataset import list_partitions, open_window
    from mtrank.pipeline.reader import ImpressionReader

    for k, v in {**KEYS, "AWS_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage.is_uri("s3://b/k") and not storage.is_uri("logs") and not storage.is_uri("file:///x")
    assert storage.join("s3://b/logs/", "dt=2026-11-01") == "s3://b/logs/dt=2026-11-01"
    assert storage.name("s3://b/logs/dt=2026-11-01/") == "dt=2026-11-01"

    frame = make_frame(spec, 40, seed=3).with_columns(pl.col("item_id").fill_null(7))   # exposures need items
    root = f"s3://{BUCKET}/fast/logs"
    for day in ("2026-11-01", "2026-11-02"):
        local = tmp_path / "logs" / f"dt={day}" / "part-00000.parquet"
        local.parent.mkdir(parents=True)
        frame.write_parquet(local, row_group_size=16)
        write_output(f"{root}/dt={day}/part-00000.parquet", local.read_bytes())
    write_output(f"{root}/notes.txt", b"not a partition")

    assert storage.kind(root) == "dir" and storage.kind(f"{root}/notes.txt") == "file"
    assert storage.kind(f"s3://{BUCKET}/fast/nothing") == "missing"
    assert [str(d) for d in list_partitions(root)] == ["2026-11-01", "2026-11-02"]
    remote, here = open_window(root, spec), open_window(tmp_path / "logs", spec)
    assert remote.root == root and remote.files[0] == f"{root}/dt=2026-11-01/part-00000.parquet"
    assert {k: v for k, v in remote.describe().items() if k != "root"} == \
        {k: v for k, v in here.describe().items() if k != "root"}
    accounts = []
    for w in (remote, here):
        reader = ImpressionReader(w, spec, progress=False)
        rows = sum(rb.num_rows for rb in reader.frames())
        accounts.append((rows, reader.accounting.as_dict()))
    assert accounts[0] == accounts[1] and accounts[0][0] == 80
    assert storage.scan_parquet(remote.files).collect().equals(pl.read_parquet(here.files))
    assert storage.read_table(remote.files[0]).equals(pq.read_table(here.files[0]))

    with pytest.raises(BadInputError, match=rf"^s3://{BUCKET}/fast/nothing: rule missing_partition: data directory "
                                            "does not exist$"):
        open_window(f"s3://{BUCKET}/fast/nothing", spec)

    # init-spec and exposures read the same objects
    opt = InferOptions(tasks=[("ctr", "click")], group_key="user_id")
    proposed = [infer_spec(r, opt).text.splitlines() for r in (root, tmp_path / "logs")]
    assert [ln for ln in proposed[0] if not ln.startswith("# Data:")] == \
        [ln for ln in proposed[1] if not ln.startswith("# Data:")]
    with pytest.raises(BadInputError, match=rf"^s3://{BUCKET}/fast/nothing: rule missing_partition: "):
        infer_spec(f"s3://{BUCKET}/fast/nothing", opt)
    day = dt.date(2026, 11, 2)
    assert count_exposures(root, day, f"s3://{BUCKET}/fast/exp.parquet").path == f"s3://{BUCKET}/fast/exp.parquet"
    count_exposures(tmp_path / "logs", day, tmp_path / "exp.parquet")
    assert storage.read_table(f"s3://{BUCKET}/fast/exp.parquet").equals(pq.read_table(tmp_path / "exp.parquet"))
    with pytest.raises(BadInputError, match=r"^s3://no-such-bucket/logs: rule missing_partition: "):
        count_exposures("s3://no-such-bucket/logs", day, tmp_path / "e2.parquet")

    # a Spark export's layout, read where it is: ds=YYYYMMDD/hour=HH/ with _SUCCESS and _temporary/
    ds = f"s3://{BUCKET}/fast/ds"
    for d in ("20261101", "20261102"):
        data = (tmp_path / "logs" / f"dt={d[:4]}-{d[4:6]}-{d[6:]}" / "part-00000.parquet").read_bytes()
        write_output(f"{ds}/ds={d}/hour=07/part-00000.parquet", data)
        write_output(f"{ds}/ds={d}/_SUCCESS", b"")
        write_output(f"{ds}/ds={d}/_temporary/0/part-00001.parquet", b"an aborted task's leftovers")
    spark = open_window(ds, spec)
    assert spark.files == [f"{ds}/ds=20261101/hour=07/part-00000.parquet", f"{ds}/ds=20261102/hour=07/part-00000.parquet"]
    assert {k: v for k, v in spark.describe().items() if k != "root"} == \
        {k: v for k, v in here.describe().items() if k != "root"}
    count_exposures(ds, day, tmp_path / "exp-ds.parquet")
    assert pq.read_table(tmp_path / "exp-ds.parquet").equals(pq.read_table(tmp_path / "exp.parquet"))
    with pytest.raises(BadInputError, match=rf"^{ds}/ds=20261105: rule missing_partition: "):
        count_exposures(ds, dt.date(2026, 11, 5), tmp_path / "e3.parquet")

    # a flat export in the bucket, laid out by day into the bucket (`mtrank partition`)
    from mtrank.jobs.partition import partition

    both = pl.concat([pl.read_parquet(f).with_columns(day=pl.lit(dt.date(2026, 11, 1 + i)))
                      for i, f in enumerate(here.files)])
    write_output(f"s3://{BUCKET}/fast/flat/all.parquet", lambda f: both.write_parquet(f))
    with pytest.raises(BadInputError, match=rf"^s3://{BUCKET}/fast/flat: rule missing_partition: .*found 1 "
                                            r"\.parquet file\(s\) directly under it: lay them out by day"):
        open_window(f"s3://{BUCKET}/fast/flat", spec)
    s = partition(f"s3://{BUCKET}/fast/flat", "day", f"s3://{BUCKET}/fast/byday", progress=False)
    assert s.rows == 80 and s.days == {"2026-11-01": 40, "2026-11-02": 40}, s
    assert open_window(f"s3://{BUCKET}/fast/byday", spec).rows == 80
    with pytest.raises(BadInputError, match="rule day_exists"):
        partition(f"s3://{BUCKET}/fast/flat", "day", f"s3://{BUCKET}/fast/byday", progress=False)
    with pytest.raises(OutputError, match=r"^cannot write s3://no-such-bucket/x\.json: "):
        write_output("s3://no-such-bucket/x.json", b"{}")


# -- end to end: the CLI on S3 against the same commands on local files ----------------------------
@pytest.fixture(scope="module")
def logs(s3, tmp_path_factory):
    """Four days of generated logs, locally and under s3://BUCKET/logs, and a small spec."""
    from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

    base = tmp_path_factory.mktemp("s3logs")
    generate_impressions(base / "logs", ImpressionConfig(seed=3, start=dt.date(2026, 11, 1), days=4, rows_per_day=1500,
                                                         n_users=300, n_items=120), progress=False)
    small_spec(base / "spec.yaml", max_buckets=2048)
    s3.upload(base / "logs", "logs")
    return base


def _error_line(stderr: str) -> str:
    """The one error line of a failed command: everything else on stderr is timestamped log lines."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ", ln) for ln in lines[:-1]), stderr
    return lines[-1]


@pytest.mark.slow
def test_validate_on_s3_counts_rows_rejections_and_collisions_as_locally(s3, logs, tmp_path):
    """A copy of the logs with a row with click = 2 and one with a NaN price planted in one day:
    the S3 report (written to S3 by --json) equals the local one but for the root; in fail mode the
    error is one line naming the S3 object; a missing prefix is one line naming the URI."""
    shutil.copytree(logs / "logs", tmp_path / "bad")
    f = tmp_path / "bad" / "dt=2026-11-02" / "part-00000.parquet"
    df = pl.read_parquet(f)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(2).otherwise(pl.col("click"))
                         .cast(df.schema["click"]).alias("click"),
                         pl.when(pl.int_range(pl.len()) == 7).then(float("nan")).otherwise(pl.col("price"))
                         .alias("price"))
    df.write_parquet(f)
    remote = s3.upload(tmp_path / "bad", "bad")
    args = ["validate", "--spec", logs / "spec.yaml", "--on-bad-row", "quarantine"]
    r = s3.run(*args, "--data", remote, "--quarantine-dir", tmp_path / "q0", "--json", f"s3://{BUCKET}/reports/v.json")
    assert r.returncode == 0, r.stderr
    r = s3.run(*args, "--data", tmp_path / "bad", "--quarantine-dir", tmp_path / "q1", "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    got, want = s3.read_json("reports/v.json"), json.loads((tmp_path / "v.json").read_text())
    assert got["window"].pop("root") == remote and want["window"].pop("root") == str(tmp_path / "bad")
    assert got["accounting"]["rejected_by_reason"] == {"click:not_binary": 1, "price:non_finite": 1}
    assert got["accounting"]["rows_read"] == 6000 and got["accounting"]["balanced"]
    assert got["collisions"] and "duplicate_rows" in got
    assert got == want

    r = s3.run("validate", "--data", remote, "--spec", logs / "spec.yaml", "--no-collisions")
    assert r.returncode == 2
    line = _error_line(r.stderr)
    assert line.startswith(f"mtrank validate: error: {remote}/dt=2026-11-02/part-00000.parquet: column "), line
    r = s3.run("validate", "--data", f"s3://{BUCKET}/nope", "--spec", logs / "spec.yaml")
    assert r.returncode == 2
    assert _error_line(r.stderr) == (f"mtrank validate: error: s3://{BUCKET}/nope: rule missing_partition: "
                                     "data directory does not exist")


@pytest.fixture(scope="module")
def trained(s3, logs):
    """`mtrank daily` on the S3 logs with the experiment's artifacts in the bucket, and `mtrank train`
    of the same job on the local copy (untracked)."""
    base = logs
    train = {"batch_size": 512, "epochs": 1, "lr": 0.003}
    write_job(base / "s3job.yaml", "s3ranker", train, data=f"s3://{BUCKET}/logs", work_dir="work_s3",
              artifact_location=f"s3://{BUCKET}/mlflow", score={"list_size": 5, "traffic_cap": {"default_cap": 4}})
    write_job(base / "localjob.yaml", "s3ranker", train, data="logs", work_dir="work_local",
              score={"list_size": 5, "traffic_cap": {"default_cap": 4}})
    r = s3.run("daily", "--config", base / "s3job.yaml", "--date", DATE)
    assert r.returncode == 0, r.stderr
    r = s3.run("train", "--config", base / "localjob.yaml", "--date", DATE, "--no-track")
    assert r.returncode == 0, r.stderr
    return base


@pytest.mark.slow
def test_training_on_s3_accounts_rows_as_on_local_files(trained):
    remote = json.loads((trained / "work_s3" / "runs" / "s3ranker" / DATE / "metrics.json").read_text())
    local = json.loads((trained / "work_local" / "runs" / "s3ranker" / DATE / "metrics.json").read_text())
    assert remote["rows"] == local["rows"] and remote["rows"]["read"] == 3000
    assert remote["eval_rows"] == local["eval_rows"] == 1500
    for w in ("train_window", "eval_window"):
        assert remote[w].pop("root") == f"s3://{BUCKET}/logs"
        local[w].pop("root")
        assert remote[w] == local[w]
    # the same data in the same order: the same model (fp32 on one thread of one machine)
    for task, m in local["tasks"].items():
        if "auc" in m:
            assert remote["tasks"][task]["auc"] == pytest.approx(m["auc"], abs=1e-6)


@pytest.mark.slow
def test_model_artifacts_live_in_the_bucket(s3, trained):
    import mlflow

    keys = s3.keys("mlflow/")
    assert any(k.endswith("/MLmodel") for k in keys), keys[:20]
    assert any("/artifacts/model/" in k for k in keys)
    assert not (trained / "work_s3" / "mlartifacts").exists()
    uri = f"sqlite:///{(trained / 'work_s3' / 'mlflow.db').resolve()}"
    v = mlflow.MlflowClient(uri, uri).get_model_version_by_alias("s3ranker", "champion")
    assert str(v.version) == "1"


@pytest.mark.slow
def test_score_reads_candidates_and_writes_ranked_lists_on_s3(s3, trained, tmp_path):
    from mtrank.jobs.exposures import count_exposures
    from mtrank.pipeline.synthetic.candidates import generate_candidates
    from mtrank.pipeline.synthetic.impressions import ImpressionConfig

    base, day = trained, dt.date.fromisoformat(DATE)
    generate_candidates(tmp_path / "cand", ImpressionConfig(seed=4, n_users=300, n_items=120), day, 30, 12, progress=False)
    cand = s3.upload(tmp_path / "cand", "cand")
    r = s3.run("exposures", "--data", f"s3://{BUCKET}/logs", "--date", DATE, "--out", f"s3://{BUCKET}/exp/e.parquet")
    assert r.returncode == 0, r.stderr
    count_exposures(base / "logs", day, tmp_path / "e.parquet")
    assert s3.read_table("exp/e.parquet").equals(pq.read_table(tmp_path / "e.parquet"))

    common = ["score", "--model", "models:/s3ranker@champion", "--config", base / "s3job.yaml", "--date", DATE]
    r = s3.run(*common, "--candidates", cand, "--exposures", f"s3://{BUCKET}/exp/e.parquet",
               "--out", f"s3://{BUCKET}/ranked/out.parquet")
    assert r.returncode == 0, r.stderr
    assert f"ranked lists: s3://{BUCKET}/ranked/out.parquet" in r.stdout
    local = tmp_path / "ranked" / "out.parquet"
    r = s3.run(*common, "--candidates", tmp_path / "cand", "--exposures", tmp_path / "e.parquet", "--out", local,
               "--no-track")
    assert r.returncode == 0, r.stderr

    assert sorted(s3.keys("ranked/")) == ["ranked/out.parquet", "ranked/out.parquet.summary.json"]
    remote, here = s3.read_table("ranked/out.parquet"), pq.read_table(local)
    assert remote.num_rows == 360 and remote.schema == here.schema
    assert remote.equals(here)
    assert pl.from_arrow(remote)["rules"].cast(pl.String).str.contains("capped").any()
    summary, local_summary = s3.read_json("ranked/out.parquet.summary.json"), json.loads(
        (tmp_path / "ranked" / "out.parquet.summary.json").read_text())
    assert summary["output"] == f"s3://{BUCKET}/ranked/out.parquet" and summary["balanced"]
    for s in (summary, local_summary):
        s.pop("output"), s.pop("seconds")
    assert summary == local_summary
