"""The registered model runs where mtrank is not installed.

A fresh virtualenv is built from nothing but the champion's own `requirements.txt`; in it, outside
the checkout, `models:/NAME@champion` loads and predicts (nulls included) the same numbers as in
the development environment, and `mlflow models serve --env-manager local` answers JSON rows.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import RANKER_DATE

pytestmark = pytest.mark.slow

MODEL = "models:/ranker@champion"

PREDICT = """
import json, sys
import mlflow, pandas as pd
rows = pd.read_json(sys.argv[1], orient="records", dtype=False)
model = mlflow.pyfunc.load_model(sys.argv[2])
schema = model.metadata.get_input_schema()
out = model.predict(rows)
json.dump({"outputs": out.astype("float64").to_dict(orient="list"),
           "inputs": schema.input_names(), "outputs_declared": model.metadata.get_output_schema().input_names(),
           "mtrank_from": __import__("mtrank.features", fromlist=["x"]).__file__}, open(sys.argv[3], "w"))
"""


def _clean_env(base: Path, venv: Path) -> dict:
    """The environment of a user who activated the fresh venv (its bin first on PATH: `mlflow models
    serve` execs uvicorn from there), with the store of the trained ranker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'work' / 'mlflow.db'}"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


@pytest.fixture(scope="module")
def fresh(ranker, tmp_path_factory):
    """A virtualenv with only the champion's pinned requirements (no mtrank, no checkout on its path)."""
    import mlflow

    uri = f"sqlite:///{ranker / 'work' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)   # MLflow keeps the registry URI of an earlier test otherwise
    reqs = Path(mlflow.pyfunc.get_model_dependencies(MODEL))
    lines = reqs.read_text().split()
    assert not any("mtrank" in r for r in lines) and "torch==2.13.0" in lines, lines
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-compile: byte-compiling every installed module up front doubles the install (84 s vs 44 s
    # measured); Python compiles what the model imports when it imports it
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile", "-r", str(reqs)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    listed = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout.lower()
    assert "nvidia" not in listed and "\nmtrank " not in listed
    return venv


def _rows(ranker: Path) -> pd.DataFrame:
    """Four logged rows of the evaluation day, as a client would send them: labels and other columns
    included, an integer id null (pandas makes it float), a string, a number with a fill and a list null."""
    f = sorted((ranker / "logs" / f"dt={RANKER_DATE}").glob("*.parquet"))[0]
    df = pq.read_table(f).slice(0, 4).to_pandas()
    df = df.drop(columns=[c for c in df.columns if df[c].dtype.kind == "M"])  # JSON has no timestamps
    df["user_id"] = df["user_id"].astype("object")
    df.loc[1, "user_id"] = None
    df.loc[2, ["device", "item_ctr_7d", "item_tags"]] = [None, None, None]
    return df


def test_the_champion_loads_and_predicts_in_a_clean_venv(ranker, fresh, tmp_path):
    import mlflow

    rows = _rows(ranker)
    rows_json = tmp_path / "rows.json"
    rows.to_json(rows_json, orient="records")
    script = tmp_path / "predict.py"
    script.write_text(PREDICT)
    # without the model's code, mtrank is not importable there
    assert subprocess.run([str(fresh / "bin" / "python"), "-c", "import mtrank.features"], cwd=tmp_path,
                          env=_clean_env(ranker, fresh), capture_output=True).returncode != 0
    r = subprocess.run([str(fresh / "bin" / "python"), str(script), str(rows_json), MODEL, str(tmp_path / "out.json")],
                       cwd=tmp_path, env=_clean_env(ranker, fresh), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert "/code/mtrank/features/" in got["mtrank_from"], got["mtrank_from"]   # the bundled copy, not a checkout
    assert "user_id" in got["inputs"] and "click" not in got["inputs"]
    uri = f"sqlite:///{ranker / 'work' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    here = mlflow.pyfunc.load_model(MODEL).predict(pd.read_json(rows_json, orient="records", dtype=False))
    assert got["outputs_declared"] == list(here.columns)
    for name, values in got["outputs"].items():
        assert values == pytest.approx(here[name].astype("float64").tolist(), rel=1e-6, abs=1e-7), name
        assert all(v == v for v in values), name        # nulls answered, never NaN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_json_rows_with_nulls(ranker, fresh, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(fresh / "bin" / "mlflow"), "models", "serve", "-m", MODEL, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=_clean_env(ranker, fresh),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):   # a bounded wait for the server (checked by state, not by time)
            if proc.poll() is not None:
                pytest.fail("server exited: " + (tmp_path / "serve.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        rows = _rows(ranker)
        records = json.loads(rows.to_json(orient="records"))
        status, body = _post(port, {"dataframe_records": records})
        assert status == 200, body
        preds = pd.DataFrame(body["predictions"])
        assert len(preds) == 4 and {"p_ctr", "p_ctcvr", "stay"} <= set(preds.columns)
        assert preds.notna().all().all()
        # a row that cannot be read is the client's error (400) naming the column, not a server error
        status, body = _post(port, {"dataframe_records": [{**records[0], "user_id": "not-a-number"}]})
        assert status == 400 and "user_id" in body.get("message", ""), (status, body)
        status, body = _post(port, {"dataframe_records": [{**records[0], "price": None}]})
        assert status == 400 and "price" in body.get("message", "") and "fill" in body["message"], (status, body)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
