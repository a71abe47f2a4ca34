"""One effective version per job and date, whoever registers it: the registry is the point of
agreement, not a lock file in one host's work directory.

Two work directories (two hosts, or a retried pod) hold the same finished training outcome and
both register it, against a real `mlflow server` whose backend store is PostgreSQL and against a
shared sqlite store: in either order the lower version wins, the other is deleted and its run
points to the winner; two `mtrank daily` processes started together on a new store agree too.
"""
from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest
import yaml

from tests.conftest import MTRANK, SMALL_MODEL
from tests.mlflow_server import MlflowServer, postgres_database

pytestmark = pytest.mark.slow   # end to end

DATE = "2026-11-03"
TRAIN = {"batch_size": 1024, "epochs": 1, "lr": 0.003}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ranker):
    """The shared ranker's finished training outcome for DATE, to be registered again by two 'hosts'."""
    base = tmp_path_factory.mktemp("onever")
    job = {"name": "seed", "data": str(ranker / "logs"), "spec": str(ranker / "spec.yaml"), "window_days": 2,
           "model": SMALL_MODEL, "train": TRAIN}
    return base, job, ranker / "work" / "runs" / "ranker" / DATE


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def store(request, tmp_path_factory):
    """A tracking URI per kind: an mlflow server on a fresh PostgreSQL database, or a sqlite file."""
    root = tmp_path_factory.mktemp(f"store-{request.param}")
    if request.param == "sqlite":
        yield "sqlite", lambda tag: f"sqlite:///{root / f'{tag}.db'}"
        return
    uri, drop = postgres_database(f"mtrank_{uuid.uuid4().hex[:12]}")
    server = MlflowServer(root, backend=uri)
    server.start()
    try:
        yield "postgres", lambda tag: server.url
    finally:
        server.stop()
        drop()


def host(trained, name: str, tag: str, uri: str):
    """A second 'host': its own work directory holding the finished outcome, one job config."""
    base, job, outcome = trained
    work = base / f"work-{name}-{tag}"
    shutil.copytree(outcome, work / "runs" / name / DATE, ignore=shutil.ignore_patterns("checkpoints"))
    path = base / f"{name}-{tag}.yaml"
    path.write_text(yaml.safe_dump({**job, "name": name, "work_dir": str(work), "tracking_uri": uri}))
    return path, work / "runs" / name / DATE


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_two_hosts_register_one_date_in_either_order(trained, store, order):
    from mtrank.jobs import tracking
    from mtrank.jobs.config import load_config

    kind, uri_of = store
    name = f"m-{kind}-{order}"
    uri = uri_of(name)
    cfgs, dirs = {}, {}
    for h in ("a", "b"):
        path, dirs[h] = host(trained, name, h, uri)
        cfgs[h] = load_config(path)
    first, second = ("a", "b") if order == "a_first" else ("b", "a")
    r1 = tracking.log_training(cfgs[first], dirs[first])     # both passed the "already registered?" check
    r2 = tracking.log_training(cfgs[second], dirs[second])
    assert r1.won and not r2.won and r1.version == r2.version
    client = tracking._client(cfgs[first])[1]
    versions = client.search_model_versions(f"name='{name}' and tag.`mtrank.date`='{DATE}'")
    assert [str(v.version) for v in versions] == [r1.version]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == r1.version
    assert client.get_run(r2.run_id).data.tags["mtrank.superseded_by_version"] == r1.version
    assert str(tracking.find_version(cfgs[second], DATE).version) == r1.version


def test_two_dailies_on_two_work_dirs_leave_one_version(trained, store):
    """Two processes at once, each with the outcome on disk (so both go straight to registering), on a
    store neither has used before (also the sqlite first-use race: MLflow creating its tables twice)."""
    kind, uri_of = store
    name = f"m-{kind}-concurrent"
    uri = uri_of(name)
    paths = [host(trained, name, h, uri)[0] for h in ("a", "b")]
    procs = [subprocess.Popen([*MTRANK, "daily", "--config", p, "--date", DATE], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in paths]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in err for _, err in outs), outs
    import mlflow

    client = mlflow.MlflowClient(uri, uri)
    versions = client.search_model_versions(f"name='{name}' and tag.`mtrank.date`='{DATE}'")
    assert len(versions) == 1, [v.version for v in versions]
    winner = str(versions[0].version)
    assert all(f"{name} v{winner}" in out for out, _ in outs), outs
    assert client.get_model_version(name, winner).tags["promotion.decision"] == "promoted"
    assert str(client.get_model_version_by_alias(name, "champion").version) == winner
