"""The MLflow run is live: open while training, curves with step numbers, datasets, standard tags,
system metrics, and a FAILED status with the error when training stops on bad input."""
from __future__ import annotations

import json

import polars as pl
import pytest

from tests.conftest import generate_demo_logs, mtrank_in_process, small_spec, sqlite_client, write_job

pytestmark = pytest.mark.slow

DATE = "2026-11-04"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("live")
    generate_demo_logs(base / "logs", days=4, rows=6000, seed=11, users=1500, items=600)
    small_spec(base / "spec.yaml")
    write_job(base / "job.yaml", "live", {"batch_size": 256, "epochs": 2, "log_every_steps": 5,
                                          "validation_days": 1, "calibration": "platt",
                                          "early_stopping": {"patience": 1}}, window_days=3)
    r = mtrank_in_process("train", "--config", base / "job.yaml", "--date", DATE, cwd=base)
    assert r.returncode == 0, r.stderr[-3000:]
    return base, r


def test_the_run_carries_step_curves_validation_datasets_and_standard_tags(trained):
    base, _ = trained
    client = sqlite_client(base)
    exp = client.get_experiment_by_name("live")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    summary = json.loads((base / "work" / "runs" / "live" / DATE / "metrics.json").read_text())
    steps = summary["global_step"]
    # the run opened before training: it spans the training time, not only the logging at the end
    assert (run.info.end_time - run.info.start_time) / 1000 >= summary["train_seconds"]
    # curves: one point every 5 steps for each task, at increasing step numbers
    tasks = [t for t in summary["epochs"][0]["loss"]]
    for t in tasks:
        hist = client.get_metric_history(run.info.run_id, f"train_loss.{t}")
        assert [h.step for h in hist] == list(range(5, steps + 1, 5)), t
    assert len(client.get_metric_history(run.info.run_id, "samples_per_s")) == steps // 5
    # validation figures per epoch, at the epoch's last step
    val = client.get_metric_history(run.info.run_id, "val_loss.ctr")
    assert len(val) == 2 and val[-1].step == steps
    assert len(client.get_metric_history(run.info.run_id, "val_auc.ctr")) == 2
    assert summary["history"]["validation"][1]["loss"]["ctr"] == pytest.approx(val[-1].value)
    assert summary["validation_window"]["start"] == summary["validation_window"]["end"] == "2026-11-03"
    assert summary["best_epoch"] in (0, 1) and summary["stopped_early"] is False   # 2 epochs, patience 1
    # datasets: training, validation and evaluation windows with their row counts
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "evaluation"}
    rows = {k: int(next(t.value for t in d.tags if t.key == "rows")) for k, d in inputs.items()}
    assert rows["training"] == summary["train_window"]["rows"] and rows["evaluation"] == summary["eval_rows"]
    assert rows["validation"] == summary["validation_window"]["rows"] == 6000
    assert json.loads(inputs["training"].dataset.schema)["mlflow_colspec"]
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) >= 7 and tags["mlflow.source.name"] == "mtrank train"
    assert "mlflow.note.content" in tags
    assert any(k.startswith("system/") for k in run.data.metrics)   # MLflow's system metrics
    # the report draws the same curves
    html = (base / "work" / "runs" / "live" / DATE / "report" / "report.html").read_text()
    assert "loss" in html.lower()


def test_the_progress_lines_say_running_means_and_validation(trained):
    _, r = trained
    assert "validation loss" in r.stderr and "epoch 2" in r.stderr


def test_a_training_that_stops_on_bad_input_ends_failed_with_the_error(tmp_path):
    generate_demo_logs(tmp_path / "logs", days=3, rows=3000, seed=12, users=800, items=300)
    small_spec(tmp_path / "spec.yaml")
    # the second training day gets a row with a null label: on_bad_row fail stops training mid-window
    part = sorted((tmp_path / "logs" / "dt=2026-11-02").glob("*.parquet"))[0]
    df = pl.read_parquet(part)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise(pl.col("click")).alias("click"))
    df.write_parquet(part)
    write_job(tmp_path / "job.yaml", "broken", {"batch_size": 256, "epochs": 1, "shuffle": False})
    r = mtrank_in_process("train", "--config", tmp_path / "job.yaml", "--date", "2026-11-03", cwd=tmp_path)
    assert r.returncode == 2 and "click" in r.stderr, r.stderr[-2000:]
    client = sqlite_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert run.info.status == "FAILED"
    assert "click" in run.data.tags["mtrank.error"]


def test_the_calibration_is_fitted_on_the_validation_day_saved_and_reported(trained):
    base, r = trained
    from mtrank.jobs.model_io import load_model

    run = base / "work" / "runs" / "live" / DATE
    summary = json.loads((run / "metrics.json").read_text())
    cal = summary["calibration"]
    assert cal["ctr"]["fitted"] and cal["ctr"]["rows"] == summary["validation_window"]["rows"]
    saved = load_model(run / "model").model.calibration_params()
    assert saved["ctr"] == pytest.approx((cal["ctr"]["scale"], cal["ctr"]["shift"]))
    ctr = summary["tasks"]["ctr"]
    assert "pcoc_uncalibrated" in ctr and abs(ctr["pcoc"] - 1) < 0.2   # ~300 positives: wide margin
    assert "calibration (Platt" in r.stderr
    assert "PCOC uncalibrated" in (run / "report" / "report.html").read_text()


def test_a_training_shorter_than_one_sampling_interval_still_has_system_metrics(tmp_path):
    """MLflow's monitor publishes after a full interval (5 s here); a job that ends sooner gets the
    sample taken at its start."""
    import mlflow

    from mtrank.jobs.live_run import LiveRun, _system_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    run_id = client.create_run(client.create_experiment("short")).info.run_id
    live = LiveRun(client, run_id, _system_metrics(run_id, uri))
    live.stop_monitor()
    metrics = client.get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu") for k in metrics) and any(k.startswith("system/system_memory")
                                                                   for k in metrics), sorted(metrics)
    live.stop_monitor()   # twice: nothing more to do
