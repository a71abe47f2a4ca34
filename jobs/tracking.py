"""MLflow tracking and registry: the only module that imports mlflow (besides the pyfunc entry).

A training outcome lives in its run directory first; this module logs it as one MLflow run and
registers the model, so a tracking server that is down costs a re-log, never a retrain.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from jobs.config import JobConfig

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CHALLENGER, CHAMPION = "challenger", "champion"


def tracking_uri(cfg: JobConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else an embedded sqlite store in the work dir."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.work_dir) / 'mlflow.db').resolve()}"


def _client(cfg: JobConfig):
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow, mlflow.MlflowClient(uri, uri)


def _experiment(mlflow, client, cfg: JobConfig) -> str:
    exp = client.get_experiment_by_name(cfg.name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(cfg).startswith("sqlite:"):  # embedded store: artifacts beside it, not in ./mlruns
        location = (Path(cfg.work_dir) / "mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.name, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def _finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}


def log_training(cfg: JobConfig, run_dir: Path) -> tuple[str, str]:
    """One MLflow run for the finished training outcome in `run_dir`; registers it as `challenger`.

    Everything comes from the run directory (metrics.json, the saved model and its spec), so a run
    whose tracking failed is logged later exactly as it would have been. Returns (run_id, version).
    """
    import torch

    from jobs.model_io import read_spec

    outcome = json.loads((run_dir / "metrics.json").read_text())
    metrics = outcome.pop("tasks")
    summary = outcome
    spec = read_spec(run_dir / "model")
    mlflow, client = _client(cfg)
    exp_id = _experiment(mlflow, client, cfg)
    date = summary["date"]
    tags = {"mtrank.date": date, "mtrank.window": f"{summary['train_window']['start']}..{summary['train_window']['end']}",
            "mtrank.git_commit": git_commit(), "mtrank.spec_hash": spec.fingerprint()}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{cfg.name}-{date}", tags=tags) as run:
        params = flatten("", cfg.model_dump(mode="json"), {})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        mlflow.log_text(spec.to_yaml(), "feature_spec.yaml")
        mlflow.log_dict({k: summary[k] for k in ("train_window", "eval_window", "rows")}, "data.json")
        rows = summary["rows"]
        mlflow.log_metrics({"rows_read": rows["read"], "rows_trained": rows["trained"],
                            "rows_rejected": rows["rejected"], "eval_rows": summary["eval_rows"],
                            "train_seconds": summary["train_seconds"]})
        for ep in summary["epochs"]:
            mlflow.log_metrics({**{f"train_loss.{t}": v for t, v in ep["loss"].items()},
                                "samples_per_s": ep["samples_per_s"]}, step=ep["epoch"] + 1)
        flat = {}
        for task, m in metrics.items():
            flat.update({f"eval.{task}.{k}": v for k, v in m.items() if k != "population"})
        mlflow.log_metrics(_finite(flat), step=len(summary["epochs"]))  # after the last epoch
        mlflow.log_dict({"python": platform.python_version(), "torch": torch.__version__,
                         "mlflow": mlflow.__version__, "git_commit": tags["mtrank.git_commit"]}, "environment.json")
        if (run_dir / "report").exists():
            mlflow.log_artifacts(str(run_dir / "report"), "report")
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                       artifacts={"model": str(run_dir / "model")},
                                       pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        run_id = run.info.run_id
    version = mlflow.register_model(info.model_uri, cfg.name, tags={
        **tags, **{f"auc.{t}": f"{m['auc']:.6f}" for t, m in metrics.items() if "auc" in m}})
    client.set_registered_model_alias(cfg.name, CHALLENGER, version.version)
    return run_id, version.version


def find_version(cfg: JobConfig, date: str):
    """The registered version a previous run made for this date (tag mtrank.date), if any."""
    _, client = _client(cfg)
    try:
        found = client.search_model_versions(f"name='{cfg.name}' and tag.`mtrank.date`='{date}'")
    except Exception as e:  # noqa: BLE001 - a registry without the model yet
        if "RESOURCE_DOES_NOT_EXIST" in str(e):
            return None
        raise
    return max(found, key=lambda v: int(v.version)) if found else None


def alias_version(cfg: JobConfig, alias: str):
    _, client = _client(cfg)
    try:
        return client.get_model_version_by_alias(cfg.name, alias)
    except Exception as e:  # noqa: BLE001 - MlflowException: alias or model missing
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
            return None
        raise


def set_challenger(cfg: JobConfig, version: str) -> None:
    _client(cfg)[1].set_registered_model_alias(cfg.name, CHALLENGER, version)


def record_decision(cfg: JobConfig, version: str, promoted: bool, reason: str, date: str) -> None:
    _, client = _client(cfg)
    client.set_model_version_tag(cfg.name, version, "promotion.decision", "promoted" if promoted else "rejected")
    client.set_model_version_tag(cfg.name, version, "promotion.reason", reason[:4000])
    client.set_model_version_tag(cfg.name, version, "promotion.date", date)
    if promoted:
        client.set_registered_model_alias(cfg.name, CHAMPION, version)


def resolve_model(ref: str, dst: Path, uri: str | None = None) -> Path:
    """A saved-model directory for `ref`: a local directory as is, or an MLflow model URI
    (`models:/NAME@alias`, `models:/NAME/3`, `runs:/ID/model`) downloaded into `dst`."""
    if "://" not in ref and ":/" not in ref:
        return Path(ref)
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # job logs, not a terminal bar
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst))
    return Path(local) / "artifacts" / "model"


def model_version_of(ref: str, uri: str) -> str | None:
    """The registry version behind `models:/NAME@alias` or `models:/NAME/N` (None for other refs)."""
    if not ref.startswith("models:/"):
        return None
    name, _, rest = ref[len("models:/"):].partition("@")
    import mlflow

    client = mlflow.MlflowClient(uri, uri)
    if rest:
        return str(client.get_model_version_by_alias(name, rest).version)
    name, _, version = name.partition("/")
    return version or None


def log_scoring(cfg: JobConfig, date: str, model_ref: str, summary: dict, summary_path: Path) -> str:
    """One MLflow run per scoring job: rows in/out, per-rule counts, the model it used."""
    mlflow, client = _client(cfg)
    exp_id = _experiment(mlflow, client, cfg)
    tags = {"mtrank.job": "score", "mtrank.date": date, "mtrank.model_uri": model_ref,
            "mtrank.git_commit": git_commit()}
    if summary.get("model_version"):
        tags["mtrank.model_version"] = str(summary["model_version"])
    with mlflow.start_run(experiment_id=exp_id, run_name=f"score-{date}", tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten("score", cfg.score.model_dump(mode="json"), {}).items()})
        flat = flatten("", {k: v for k, v in summary.items() if k not in ("model_version", "files", "output")}, {})
        mlflow.log_metrics(_finite(flat))
        mlflow.log_artifact(str(summary_path))
        return run.info.run_id


def log_tuning(cfg: JobConfig, date: str, model_ref: str, result: dict, json_path: Path | None) -> str:
    """One MLflow run per `mtrank tune-fusion`: start and best parameters, both objectives on the
    tuning and holdout halves, and the full result (every trial) as an artifact."""
    mlflow, client = _client(cfg)
    exp_id = _experiment(mlflow, client, cfg)
    tags = {"mtrank.job": "tune-fusion", "mtrank.date": date, "mtrank.model_uri": model_ref,
            "mtrank.objective": f"{result['objective']}@{result['k']}", "mtrank.git_commit": git_commit()}
    if result.get("model_version"):
        tags["mtrank.model_version"] = str(result["model_version"])
    with mlflow.start_run(experiment_id=exp_id, run_name=f"tune-fusion-{date}", tags=tags) as run:
        params = {**{f"start.{k}": v for k, v in result["start"]["params"].items()},
                  **{f"best.{k}": v for k, v in result["best"]["params"].items()},
                  **{k: result[k] for k in ("objective", "k", "trials", "trial_budget", "seed", "max_rows")}}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        flat = flatten("", {"start": {h: result["start"][h] for h in ("tune", "holdout")},
                            "best": {h: result["best"][h] for h in ("tune", "holdout")},
                            "change": result["change"], "rows": result["rows"],
                            "split": {h: result["split"][h] for h in ("tune", "holdout")},
                            "seconds": result["seconds"]}, {})
        mlflow.log_metrics(_finite(flat))
        if json_path is not None:
            mlflow.log_artifact(str(json_path))
        else:
            mlflow.log_dict(result, "tune_fusion.json")
        return run.info.run_id
