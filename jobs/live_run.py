"""The MLflow run of one training, open while it trains.

The run is created when training starts (its id kept in the run directory, so a resumed or re-logged
training continues the same run), receives the training curves every `train.log_every_steps`, the
validation figures every epoch and MLflow's system metrics, and is closed FINISHED by registration
(`tracking.log_training`), or FAILED / KILLED with the error when training stops.

Everything here is best effort: a tracking server that is down, or goes down mid-training, costs a
warning and the live curves, never the training. The outcome is on disk, and registration logs the
curves the live run missed.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path

from mtrank.jobs.config import JobConfig
from mtrank.pipeline.trainer import TrainingEvents

log = logging.getLogger("mtrank")

RUN_FILE = "mlflow_run.json"   # {"run_id", "tracking_uri"} in the run directory


def read_run_id(run_dir: Path, uri: str) -> str | None:
    """The live run of this run directory, if it was opened on the same store."""
    try:
        d = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return d.get("run_id") if d.get("tracking_uri") == uri else None


def standard_tags(cfg: JobConfig, date: dt.date, command: str) -> dict[str, str]:
    """MLflow's own tags (source, commit, description) plus the job's date."""
    from mtrank.jobs.store import git_commit

    return {"mlflow.source.name": f"mtrank {command}", "mlflow.source.type": "JOB",
            "mlflow.source.git.commit": git_commit(), "mtrank.date": date.isoformat(),
            "mlflow.note.content": f"`mtrank {command}` of job {cfg.name} for {date}: trains on the window before "
                                   f"{date}, evaluates on {date}; curves, datasets, the report and the model are "
                                   "in this run."}


def _schema(arrow_schema):
    from mlflow.types.schema import ColSpec, DataType, Schema

    import pyarrow as pa

    from mtrank.features.inputs import plain_type

    def kind(t):
        t = plain_type(t)
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return DataType.string
        if pa.types.is_integer(t):
            return DataType.long
        if pa.types.is_floating(t):
            return DataType.double
        if pa.types.is_boolean(t):
            return DataType.boolean
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            return DataType.datetime
        return DataType.binary if pa.types.is_binary(t) else DataType.string

    return Schema([ColSpec(kind(f.type), f.name, required=not f.nullable) for f in arrow_schema])


def dataset_inputs(window, context: str):
    """A data window as an MLflow dataset: Parquet source (its root), a digest of the exact files and
    row groups it covers, the schema and the row counts."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    d = window.describe()
    digest = hashlib.sha256(json.dumps({**d, "files": list(window.files)}, sort_keys=True, default=str).encode())
    source = resolve_dataset_source(str(window.root))
    ds = MetaDataset(source, name=f"{Path(str(window.root)).name}[{d['start']}..{d['end']}]",
                     digest=digest.hexdigest()[:16],
                     schema=_schema(window.schema) if window.schema is not None else None)
    tags = [InputTag("mlflow.data.context", context), InputTag("rows", str(d["rows"])),
            InputTag("files", str(d["files"])), InputTag("row_groups", str(d["row_groups"]))]
    return DatasetInput(ds._to_mlflow_entity(), tags)


def step_metrics(point: dict) -> dict[str, float]:
    """A curve point as MLflow metrics (logged at its global step)."""
    return {**{f"train_loss.{t}": v for t, v in point["loss"].items()},
            "samples_per_s": point["samples_per_s"], "epoch": point["epoch"]}


def epoch_metrics(record: dict) -> dict[str, float]:
    """An epoch's record as MLflow metrics: its mean losses and the validation figures."""
    val = record.get("validation") or {}
    return {**{f"epoch_loss.{t}": v for t, v in record["loss"].items()},
            **{f"val_loss.{t}": v for t, v in val.get("loss", {}).items()},
            **{f"val_auc.{f}": v for f, v in val.get("auc", {}).items() if v is not None}}


class LiveRun(TrainingEvents):
    """Training events as MLflow metrics of one run; silent (logged once) when tracking is down."""

    def __init__(self, client=None, run_id: str | None = None, monitor=None):
        self.client, self.run_id, self._monitor = client, run_id, monitor
        self.points: list[dict] = []   # the curve points of this process (the report draws them)

    def history(self, epochs: list[dict]) -> dict:
        """The report's curves: training points every N steps, validation per epoch."""
        return {"train": list(self.points),
                "validation": [{"epoch": e["epoch"], "step": e.get("step"), **e["validation"]}
                               for e in epochs if e.get("validation")]}

    @property
    def active(self) -> bool:
        return self.client is not None

    @classmethod
    def start(cls, cfg: JobConfig, date: dt.date, run_dir: Path, command: str,
              datasets: list[tuple[object, str]]) -> "LiveRun":
        from mtrank.jobs.store import TrackingRefused, _client, _experiment, refusal, refused_status, tracking_uri

        try:
            mlflow, client = _client(cfg)
            uri = tracking_uri(cfg)
            exp_id = _experiment(mlflow, client, cfg)
            run_id = read_run_id(run_dir, uri)
            if run_id is not None and _exists(client, run_id):
                client.update_run(run_id, "RUNNING")
                log.info("MLflow run %s continues (live curves)", run_id)
            else:
                tags = {**standard_tags(cfg, date, command), "mlflow.runName": f"{cfg.name}-{date}"}
                run_id = client.create_run(exp_id, run_name=tags["mlflow.runName"], tags=tags).info.run_id
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                (Path(run_dir) / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
                client.log_inputs(run_id, datasets=[dataset_inputs(w, ctx) for w, ctx in datasets])
                log.info("MLflow run %s opened in %s (live curves)", run_id, uri)
            return cls(client, run_id, _system_metrics(run_id, uri))
        except Exception as e:  # noqa: BLE001 - tracking never stops training, unless it refuses the job
            status = refused_status(e)
            if status is not None:   # credentials or permissions do not appear while it trains: stop now
                raise TrackingRefused(f"{refusal(tracking_uri(cfg), 'opening the training run', status)}. "
                                      "Nothing was trained.") from None
            log.warning("MLflow is not reachable, training goes on without live curves; the run is logged "
                        "when the model is registered (%s)", str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            return cls()

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()
                                                        if v == v and abs(v) != float("inf")])
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow stopped answering; live curves end here, training goes on (%s)",
                        str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            self.client = None

    def on_steps(self, point: dict) -> None:
        self.points.append(point)
        self._log(step_metrics(point), point["step"])

    def on_epoch(self, record: dict) -> None:
        self._log(epoch_metrics(record), record["step"])

    def on_validation(self, point: dict) -> None:
        """A `validate_every_steps` point: the epoch ends' val_loss.* / val_auc.* at its step (one curve)."""
        self._log(epoch_metrics({"loss": {}, "step": point["step"], "validation": point["validation"]}), point["step"])

    def stop_monitor(self) -> None:
        """Stop the sampler; a training shorter than one sampling interval still gets the sample it
        took when it started (MLflow's monitor publishes only after a full interval)."""
        m, self._monitor = self._monitor, None
        if m is None:
            return
        try:
            m.finish()
            if getattr(m, "_logging_step", None) == 0:
                m.publish_metrics(m.aggregate_metrics())
                m.mlflow_logger.flush()
        except Exception as e:  # noqa: BLE001 - an optional extra
            log.info("system metrics not logged (%s)", e)

    def end(self, error: BaseException) -> None:
        """A training that stopped: FAILED with its error, KILLED when interrupted."""
        self.stop_monitor()
        if self.client is None:
            return
        status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self.client.set_tag(self.run_id, "mtrank.error", (str(error) or type(error).__name__)[:4000])
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - the run stays RUNNING; a rerun continues it
            pass


def _exists(client, run_id: str) -> bool:
    """An unfinished run of this run directory (a training cut off, or not yet registered): it is
    continued. A FINISHED one belongs to a completed registration; a forced retrain opens a new run."""
    try:
        info = client.get_run(run_id).info
        return info.lifecycle_stage == "active" and info.status != "FINISHED"
    except Exception:  # noqa: BLE001 - deleted, or another store
        return False


def _system_metrics(run_id: str, uri: str):
    """MLflow's CPU / memory / disk sampler for the run (psutil), while training runs."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - an optional extra
        log.info("no system metrics (%s)", e)
        return None
