"""The HTTP path: `mtrank daily` against a real `mlflow server` on 127.0.0.1 (started here, lean:
one worker, no job execution, artifacts proxied to a local folder), stopped afterwards."""
import mlflow
import pytest
import yaml

from tests.conftest import generate_demo_logs, mtrank_in_process, small_spec, write_job
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow   # end to end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("server"))
    s.start()
    yield s.url, s.root
    s.stop()


def daily(path, date):
    """The job as a client of the server, through main() in this process (the server is a real one)."""
    return mtrank_in_process("daily", "--config", path, "--date", date)


def test_daily_over_http_promotes_gates_and_reruns(server, tmp_path):
    """Same flow as over sqlite: first date promoted, a model that learned nothing registered but
    not promoted, a rerun of a date adds no version."""
    url, root = server
    generate_demo_logs(tmp_path / "logs", days=4, rows=20_000, seed=4, users=1500, items=600)
    small_spec(tmp_path / "spec.yaml")
    model = {"experts": 2, "expert_mlp": [16], "tower_mlp": [8]}
    write_job(tmp_path / "good.yaml", "ranker-http", {"batch_size": 1024, "epochs": 2, "lr": 0.003}, model=model,
              tracking_uri=url)
    write_job(tmp_path / "bad.yaml", "ranker-http", {"batch_size": 1024, "lr": 1e-7, "sparse_lr": 1e-7}, model=model,
              tracking_uri=url)
    r = daily(tmp_path / "good.yaml", "2026-11-03")
    assert r.returncode == 0, r.stderr
    assert "champion (first version" in r.stdout and url in r.stdout
    client = mlflow.MlflowClient(url, url)
    v = client.get_model_version_by_alias("ranker-http", "champion")
    assert v.tags["mtrank.date"] == "2026-11-03"
    r = daily(tmp_path / "bad.yaml", "2026-11-04")
    assert r.returncode == 0, r.stderr
    assert "not promoted" in r.stdout
    assert str(client.get_model_version_by_alias("ranker-http", "champion").version) == "1"
    assert daily(tmp_path / "good.yaml", "2026-11-03").returncode == 0
    assert len(client.search_model_versions("name='ranker-http'")) == 2
    # the artifacts went through the server into its artifacts destination, not the client's disk
    assert any((root / "artifacts").rglob("weights.pt"))
    assert not (tmp_path / "work" / "mlflow.db").exists()


def test_an_authenticated_server_refuses_in_one_line_and_works_with_credentials(tmp_path_factory, tmp_path,
                                                                                monkeypatch):
    """MLflow's basic-auth app, as a team's server runs it: no credentials and a user without the
    permission are each one line naming the status and what to set (they were MLflow tracebacks);
    with credentials the job trains, registers and promotes."""
    from mlflow.server import get_app_client

    s = MlflowServer(tmp_path_factory.mktemp("auth-server"), admin_password="adm1n-Passw0rd!")
    s.start()
    try:
        generate_demo_logs(tmp_path / "logs", days=3, rows=5_000, seed=6, users=500, items=300)
        small_spec(tmp_path / "spec.yaml", max_buckets=2048)
        write_job(tmp_path / "job.yaml", "ranker-auth", {"batch_size": 1024, "epochs": 1, "lr": 0.003},
                  model={"experts": 2, "expert_mlp": [16], "tower_mlp": [8]}, tracking_uri=s.url)
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            monkeypatch.delenv(k, raising=False)
        r = daily(tmp_path / "job.yaml", "2026-11-03")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith(
            f"mtrank daily: error: tracking server {s.url} refused the request while looking up the version "
            "registered for this date: HTTP 401, not authenticated; no credentials were given: set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), r.stderr[-2000:]

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "adm1n-Passw0rd!")
        get_app_client("basic-auth", tracking_uri=s.url).create_user("bob", "b0b-Passw0rd!")
        r = daily(tmp_path / "job.yaml", "2026-11-03")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "v1: champion" in r.stdout and f"open the UI: {s.url}" in r.stdout

        # bob may read (MLflow's default permission) but not write to admin's experiment
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "b0b-Passw0rd!")
        r = mtrank_in_process("generate", "--candidates", "--out", tmp_path / "cand", "--date", "2026-11-03",
                              "--requests", 20, "--per-request", 10, "--seed", 1, "--users", 500, "--items", 300)
        assert r.returncode == 0, r.stderr
        out = tmp_path / "ranked.parquet"
        r = mtrank_in_process("score", "--config", tmp_path / "job.yaml", "--model", "models:/ranker-auth@champion",
                              "--candidates", tmp_path / "cand", "--date", "2026-11-03", "--out", out)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (
            f"mtrank score: error: tracking server {s.url} refused the request while opening the score run: "
            "HTTP 403, user bob lacks the permission; grant it on this job's experiment and registered model "
            "(MLflow's permission API or UI), or run the job as a user who has it. Nothing was scored (--no-track "
            "runs the job without an MLflow run)."), r.stderr[-2000:]
        assert not out.exists() and "scoring with" not in r.stderr   # refused before any candidate was read
        job = yaml.safe_load((tmp_path / "job.yaml").read_text())
        job.setdefault("score", {})["fusion"] = {"factors": [{"output": "p_ctr"}, {"output": "p_cvr", "offset": 0.1,
                                                                    "search": {"offset": {"lo": 0.01, "hi": 1.0}}}]}
        (tmp_path / "tune.yaml").write_text(yaml.safe_dump(job))
        r = mtrank_in_process("tune-fusion", "--config", tmp_path / "tune.yaml", "--model",
                              "models:/ranker-auth@champion", "--date", "2026-11-03")
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
            "Nothing was tuned (--no-track runs the job without an MLflow run)."), r.stderr[-2000:]
        r = mtrank_in_process("score", "--config", tmp_path / "job.yaml", "--model", "models:/ranker-auth@champion",
                              "--candidates", tmp_path / "cand", "--date", "2026-11-03", "--out", out, "--no-track")
        assert r.returncode == 0 and out.exists(), r.stderr[-2000:]   # reading the registry is all it needs
        # nor train into it: refused when the live run opens, before any training (it used to train
        # first and fail only at registration)
        r = mtrank_in_process("train", "--config", tmp_path / "job.yaml", "--date", "2026-11-03")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].endswith(
            "refused the request while opening the training run: HTTP 403, user bob lacks the permission; grant it "
            "on this job's experiment and registered model (MLflow's permission API or UI), or run the job as a "
            "user who has it. Nothing was trained."), r.stderr[-2000:]
        assert "epoch 1" not in r.stderr
    finally:
        s.stop()
