"""Where a job's MLflow store is, and the client, experiment and commit every tracking module uses.

Below `tracking` (registration) and `live_run` (the run open while training), which both build on it.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from mtrank.features.base import MtrankError
from mtrank.jobs.config import JobConfig

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")   # the UI's model-training view


def _http_settings(cfg: JobConfig) -> None:
    """The job's retry bound, applied to MLflow's own HTTP client (read per request from the env)."""
    t = cfg.tracking
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(t.retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(t.backoff_seconds)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(t.timeout_seconds)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")  # an exact bound for a batch job


def tracking_uri(cfg: JobConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else an embedded sqlite store in the work dir.
    Also applies the job's `tracking:` retry bound to MLflow's HTTP client."""
    _http_settings(cfg)
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.work_dir) / 'mlflow.db').resolve()}"


class TrackingRefused(MtrankError, PermissionError):
    """The tracking server answered, and refused: not authenticated (401) or not allowed (403)."""


_REFUSED_CODE = re.compile(r"error code (401|403)\b")


def refused_status(e: BaseException | None) -> int | None:
    """401 or 403 when the server refused the request (anywhere in the chain), else None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "error_code", None)
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return 401 if code == "UNAUTHENTICATED" else 403
        m = _REFUSED_CODE.search(str(e))
        if m and "API request to" in str(e):
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def refusal(uri: str, action: str, status: int) -> str:
    """The one line for a refused request: what to set (401) or who lacks what (403)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        how = ("the credentials given were not accepted" if user or os.environ.get("MLFLOW_TRACKING_TOKEN") else
               "no credentials were given") + (": set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                                "MLFLOW_TRACKING_TOKEN) for this server")
        return f"tracking server {uri} refused the request while {action}: HTTP 401, not authenticated; {how}"
    return (f"tracking server {uri} refused the request while {action}: HTTP 403, user {user or '(token)'} lacks "
            "the permission; grant it on this job's experiment and registered model (MLflow's permission API or "
            "UI), or run the job as a user who has it")


_READY: set[str] = set()


class StoreNotFound(MtrankError, LookupError):
    """A command that reads the registry found no store where the job points (it never creates one)."""


def require_store(uri: str | None, what: str) -> str:
    """`uri` when a store is there to read. Only training creates a store: every other command that
    would otherwise make an empty `mlflow.db` (MLflow's default in the working directory, or the
    job's sqlite file) says where it looked instead."""
    how = "pass --config JOB.yaml (its tracking_uri, else work_dir/mlflow.db), --tracking-uri URI, or set MLFLOW_TRACKING_URI"
    if not uri:
        raise StoreNotFound(f"{what} needs an MLflow store and none is configured: {how}")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise StoreNotFound(f"{what}: there is no MLflow store at {uri} (no job has trained there yet): {how}")
    return uri


def ensure_store(uri: str) -> None:
    """Create an embedded sqlite store once, under a file lock: MLflow creates and migrates its
    tables on first use, and two processes doing that at once on one new file collide
    (`duplicate column name`). Other stores (a server, PostgreSQL) manage themselves."""
    if uri in _READY or not uri.startswith("sqlite:///"):
        return
    import fcntl

    import mlflow

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = mlflow.MlflowClient(uri, uri)
        client.search_experiments(max_results=1)        # tracking tables
        client.search_registered_models(max_results=1)  # registry tables
    _READY.add(uri)


def _client(cfg: JobConfig):
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # job logs, not a terminal bar
    uri = tracking_uri(cfg)
    ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow, mlflow.MlflowClient(uri, uri)


def _experiment(mlflow, client, cfg: JobConfig) -> str:
    exp = client.get_experiment_by_name(cfg.name)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:   # shown as a model-training experiment, not a GenAI one
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = cfg.artifact_location   # e.g. s3://bucket/mlflow: model files in the bucket
    if location is None and tracking_uri(cfg).startswith("sqlite:"):  # embedded store: artifacts beside it
        location = (Path(cfg.work_dir) / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(cfg.name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception as e:  # noqa: BLE001 - another host created it between our lookup and our create
        exp = client.get_experiment_by_name(cfg.name)
        if exp is None or not ("RESOURCE_ALREADY_EXISTS" in str(e) or "already exists" in str(e).lower()
                               or "UNIQUE constraint" in str(e) or "duplicate key" in str(e)):
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
