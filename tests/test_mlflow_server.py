"""The HTTP path: `mtrank daily` against a real `mlflow server` on 127.0.0.1 (started here, lean:
one worker, no job execution, artifacts proxied to a local folder), stopped afterwards."""
import mlflow
import pytest

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
