"""`mtrank train` as a scheduled job runs it: real processes, a real kill -9, then --resume."""
import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from mtrank.jobs.config import load_config
from mtrank.features.spec import SpecError

from tests.conftest import MTRANK, generate_demo_logs, mtrank_in_process, small_spec, write_job

pytestmark = pytest.mark.slow   # end-to-end: trains models, starts servers or ranks


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    base = tmp_path_factory.mktemp("job")
    generate_demo_logs(base / "logs", days=3, rows=20_000, seed=5, users=3000, items=1000)
    small_spec(base / "spec.yaml")
    return write_job(base / "job.yaml", "t", {"batch_size": 512, "checkpoint_every": 20, "epochs": 2},
                     model={"experts": 3, "expert_mlp": [64, 32], "tower_mlp": [16]})


def train(job, *extra):
    """A real process: the resumed run is the one that must finish after the kill."""
    return subprocess.run([*MTRANK, "train", "--config", job, "--date", "2026-11-03", *extra],
                          capture_output=True, text=True)


def test_kill_9_then_resume_finishes_the_run(job):
    run = job.parent / "work" / "runs" / "t" / "2026-11-03"
    proc = subprocess.Popen([*MTRANK, "train", "--config", job, "--date", "2026-11-03"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = run / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["checkpoints"][-1]["step"] >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make the job longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    r = train(job, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in r.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"]["trained"] == 2 * 40_000 and metrics["rows"]["read"] == 2 * 40_000
    assert metrics["resumed_from_step"] >= 40
    assert metrics["tasks"]["ctr"]["auc"] > 0.55
    assert (run / "model" / "weights.pt").exists() and (run / "model" / "feature_spec.yaml").exists()


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\ntrain: {epochs: 1, learning_rate: 0.1}\nmodel: {bottom: moe}\n")
    with pytest.raises(SpecError) as e:
        load_config(bad)
    assert "train.learning_rate: unknown key" in str(e.value) and "model.bottom" in str(e.value)
    r = mtrank_in_process("train", "--config", bad, "--date", "2026-11-03")
    assert r.returncode == 2 and "train.learning_rate: unknown key" in r.stderr
    cfg = load_config()
    assert cfg.model.bottom == "mmoe" and cfg.train.batch_size == 4096



def test_command_line_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    """`--data logs` from a shell means ./logs, wherever the YAML lives; the YAML's own relative
    paths still resolve against its folder."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "job.yaml").write_text("data: logs\nwork_dir: work\n")
    here = tmp_path / "shell"
    here.mkdir()
    monkeypatch.chdir(here)
    from_yaml = load_config(conf / "job.yaml")
    assert (from_yaml.data, from_yaml.work_dir) == (str(conf / "logs"), str(conf / "work"))
    given = load_config(conf / "job.yaml", data="logs", work_dir="out/w", spec="s.yaml")
    assert (given.data, given.work_dir, given.spec) == (str(here / "logs"), str(here / "out/w"), str(here / "s.yaml"))
    assert load_config(conf / "job.yaml", data="s3://bucket/logs").data == "s3://bucket/logs"
    r = mtrank_in_process("train", "--config", conf / "job.yaml", "--data", "logs", "--date", "2026-11-03")
    assert r.returncode == 2 and str(here / "logs") in r.stderr, r.stderr

def test_missing_eval_day_is_a_clear_error(job):
    r = mtrank_in_process("train", "--config", job, "--date", "2026-11-04")
    assert r.returncode == 2 and "dt=2026-11-04" in r.stderr and "missing_partition" in r.stderr


def test_saved_model_reloads_in_another_process_and_evaluates(job, tmp_path):
    """The CLI process trained and scored the day; this process loads the saved weights
    (weights_only) and must reproduce its metrics exactly; `mtrank evaluate` writes the report."""
    from html.parser import HTMLParser

    from mtrank.jobs.evaluate import evaluate_model
    from mtrank.jobs.model_io import load_model

    run = job.parent / "work" / "runs" / "t" / "2026-11-03"
    if not (run / "metrics.json").exists():
        assert train(job).returncode == 0
    trained = json.loads((run / "metrics.json").read_text())["tasks"]
    ev, pred = evaluate_model(load_model(run / "model"), str(job.parent / "logs"), dt.date(2026, 11, 3))
    for task in ("ctr", "cvr", "ctcvr", "collect", "cart"):
        assert ev.metrics[task]["auc"] == pytest.approx(trained[task]["auc"], abs=1e-12), task
        assert ev.metrics[task]["gauc_groups"] > 0 and 0 < ev.metrics[task]["gauc"] < 1
    assert set(ev.gates) == {"ctr", "cvr", "stay", "collect", "cart"}
    assert all(abs(sum(g) - 1) < 1e-4 and len(g) == 3 for g in ev.gates.values())

    out = tmp_path / "report"
    r = mtrank_in_process("evaluate", "--model", run / "model", "--data", job.parent / "logs",
                          "--date", "2026-11-03", "--baseline", run / "model", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "ctcvr" in r.stdout and "report:" in r.stdout

    class Figures(HTMLParser):
        tags: list = []

        def handle_starttag(self, tag, attrs):
            if tag in ("img", "figure", "svg"):
                self.tags.append((tag, dict(attrs)))

    p = Figures()
    page = (out / "report.html").read_text()
    p.feed(page)
    # ROC, calibration, histograms, expert gates: each an inline <svg> in a <figure>, no image
    assert [t for t, _ in p.tags] == ["figure", "svg"] * 4
    assert all(a["role"] == "img" and a["aria-label"] and a["viewbox"] for t, a in p.tags if t == "svg")
    svgs = re.findall(r"<svg\b.*?</svg>", page, re.S)
    assert len(svgs) == 4 and all(ET.fromstring(s).findall(".//{http://www.w3.org/2000/svg}g[@class='panel']")
                                  for s in svgs)                    # each parses as XML, with its panels
    assert all("<polyline" in s for s in svgs[:3]) and svgs[3].count("<rect") > 5    # curves; the gates' cells
    assert "GAUC" in page and "oracle AUC" in page and "Δ" in page and "+0.0000" in page
    m = json.loads((out / "metrics.json").read_text())
    assert m["tasks"]["ctr"]["auc"] == pytest.approx(trained["ctr"]["auc"], abs=1e-12)
    assert (run / "report" / "report.html").exists()


def test_run_logged_and_registered_model_scores_raw_rows(job):
    """The CLI's MLflow run (embedded sqlite store) registered a pyfunc that scores raw columns with
    the model's own hashing; loaded here (another process) it matches the saved model's outputs."""
    import mlflow
    import pyarrow.parquet as pq

    from mtrank.jobs.evaluate import evaluate_model
    from mtrank.jobs.model_io import load_model

    work = job.parent / "work"
    run = work / "runs" / "t" / "2026-11-03"
    if not (work / "mlflow.db").exists():
        assert train(job).returncode == 0
    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("t", "challenger")
    assert version.tags["mtrank.date"] == "2026-11-03" and version.tags["mtrank.window"] == "2026-11-01..2026-11-02"
    assert float(version.tags["auc.ctr"]) > 0.55 and len(version.tags["mtrank.git_commit"]) >= 7
    r = client.get_run(version.run_id)
    assert r.data.metrics["rows_read"] == r.data.metrics["rows_trained"] + r.data.metrics["rows_rejected"]
    assert "eval.ctcvr.auc" in r.data.metrics and "train_loss.ctr" in r.data.metrics
    assert r.data.params["model.bottom"] == "mmoe"
    arts = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"report", "feature_spec.yaml", "config.json", "data.json", "environment.json"} <= arts

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/t@challenger")
    day = job.parent / "logs" / "dt=2026-11-03"
    raw = pq.read_table(next(day.glob("*.parquet"))).slice(0, 3000).to_pandas()
    raw = raw.drop(columns=["click", "conversion", "stay_seconds", "collect", "cart"])  # labels not needed
    out = pyfunc.predict(raw)
    assert {"p_ctr", "p_cvr", "p_ctcvr", "stay", "p_collect", "p_cart", "p_ctcart"} <= set(out.columns)
    _, pred = evaluate_model(load_model(run / "model"), str(job.parent / "logs"), dt.date(2026, 11, 3), max_rows=3000)
    # the same rows as evaluation where the logged slot is the one serving sets (position: serve_value 0);
    # on rows shown lower, evaluation reads the logged slot and serving the top one
    top = (raw["position"] == 0).to_numpy()
    assert 50 < top.sum() < len(top)
    meta = json.loads((run / "report" / "metrics.json").read_text())["meta"]   # the report says so
    assert meta["set when ranking"] == ("position = 0 (serve_value); the figures here read the logged values "
                                        "(AUC as served: beside them)")
    served = meta["AUC as served"]   # and the day's figures as serving ranks: every row in the top slot
    tasks = json.loads((run / "report" / "metrics.json").read_text())["tasks"]
    assert served["set"] == {"position": 0} and served["ctr"]["logged_auc"] == tasks["ctr"]["auc"]
    assert 0.5 < served["ctr"]["auc"] != tasks["ctr"]["auc"]
    for col in ("p_ctr", "p_ctcvr", "stay"):
        np.testing.assert_allclose(out[col].to_numpy()[top], pred.outputs[col][top], rtol=1e-5, atol=1e-7)
    assert not np.allclose(out["p_ctr"].to_numpy()[~top], pred.outputs["p_ctr"][~top], rtol=1e-3)
