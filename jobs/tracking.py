"""MLflow tracking and registry: with `packaging` and the pyfunc entry, the only modules that import mlflow.

A training outcome lives in its run directory first; this module logs it as one MLflow run and
registers the model, so a tracking server that is down costs a re-log, never a retrain.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import platform
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mtrank.features.base import MtrankError, failpoint
from mtrank.jobs.config import JobConfig
from mtrank.jobs.model_io import load_model, read_spec
from mtrank.jobs.paths import run_dir
from mtrank.jobs.store import (StoreNotFound, TrackingRefused, _client, _experiment, ensure_store,  # noqa: F401
                               git_commit, refusal, refused_status, require_store, tracking_uri)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CHALLENGER, CHAMPION = "challenger", "champion"


class ModelNotFound(MtrankError, LookupError):
    """A model reference the registry does not have (a mistyped name, alias or version)."""


@contextmanager
def _registry_lookup(ref: str, uri: str | None):
    """MLflow's 'RESOURCE_DOES_NOT_EXIST' for a model reference as one clear ModelNotFound line."""
    try:
        yield
    except MtrankError:
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException without a usable type to catch on its own
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(e, "error_code", "")) and "not found" not in str(e).lower():
            raise
        raise ModelNotFound(f"{ref}: {str(e).splitlines()[0].rstrip('.')} in {uri or 'the tracking store'}"
                            f"{_known(ref, uri)}") from None


def _known(ref: str, uri: str | None) -> str:
    """'; it has versions 1, 2 and aliases champion, challenger' for the model `ref` names, if any."""
    if not ref.startswith("models:/"):
        return ""
    name = ref[len("models:/"):].split("@")[0].split("/")[0]
    try:
        import mlflow

        client = mlflow.MlflowClient(uri, uri)
        model = client.get_registered_model(name)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        return (f"; model {name!r} has versions {', '.join(map(str, versions)) or 'none'} and aliases "
                f"{', '.join(sorted(model.aliases)) or 'none'}")
    except Exception:  # noqa: BLE001 - the hint is best effort
        return f"; the store has no registered model {name!r}"


class TrackingUnavailable(MtrankError, RuntimeError):
    """The tracking server did not answer within the configured retries (job config `tracking:`)."""


def _unreachable(e: BaseException | None) -> bool:
    """A connection refused/reset/timed out, or HTTP 5xx after MLflow's retries (anywhere in the chain)."""
    import requests

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                          requests.exceptions.Timeout, requests.exceptions.RetryError)):
            return True
        if type(e).__module__.startswith("urllib3.") and type(e).__name__ in (
                "MaxRetryError", "ProtocolError", "NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
            return True
        msg = str(e)  # MLflow flattens the cause into its message (parallel artifact transfers: one per file)
        if "API request to" in msg and ("failed with exception" in msg or "failed with timeout" in msg):
            return True
        e = e.__cause__ or e.__context__
    return False


BACK = "once the server is back"                  # when a rerun succeeds, in the hints below
ALLOWED = "once the server accepts the request"    # ... when the server refused (401/403)


def _outcome_hint(run_dir: Path, date: str) -> str:
    return (f"The training outcome is kept in {run_dir} (metrics.json, model/, report/): rerunning "
            f"`mtrank daily --date {date}` with the same config {BACK} logs and registers "
            "it without retraining.")


REGISTRY_HINT = ("Nothing half-registered was left: a version is registered only after its artifacts were "
                 f"logged, and `champion` moves only after a completed evaluation; rerun the same command {BACK}.")


DOWNLOAD_HINT = ("Nothing was changed in the registry (`champion` moves only after a completed evaluation); "
                 f"rerun the same command {BACK}.")


@contextmanager
def _reachable(uri: str, action: str, hint=REGISTRY_HINT):
    """Turn 'the server is not there' (after MLflow's bounded retries) into one clear TrackingUnavailable."""
    try:
        yield
    except (TrackingUnavailable, TrackingRefused):
        raise
    except Exception as e:
        if not uri.startswith(("http://", "https://")):
            raise
        status = refused_status(e)
        if status is not None:
            h = (hint() if callable(hint) else hint).replace(BACK, ALLOWED)
            raise TrackingRefused(f"{refusal(uri, action, status)}. {h}") from None
        if not _unreachable(e):
            raise
        from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
                                                  MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)

        retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
        errno = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
        cause = errno.group(0).strip() if errno else str(e)[:300]
        bound = (f"tracking: retries {retries}, backoff {MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()} s doubling, "
                 f"timeout {MLFLOW_HTTP_REQUEST_TIMEOUT.get()} s per request")
        attempts = retries + 1
        raise TrackingUnavailable(
            f"tracking server {uri} is unavailable: {attempts} attempts failed while {action} ({bound}); "
            f"last error: {cause}. {hint() if callable(hint) else hint}") from e


def _guarded(action: str, hint=None):
    """`_reachable` around a function whose first argument is the job config; `hint(cfg, *args)`."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg: JobConfig, *args, **kwargs):
            h = (lambda: hint(cfg, *args)) if hint else REGISTRY_HINT
            with _reachable(tracking_uri(cfg), action, h):
                return fn(cfg, *args, **kwargs)
        return inner
    return wrap


def _log_hint(cfg: JobConfig, run_dir: Path) -> str:
    try:
        date = json.loads((Path(run_dir) / "metrics.json").read_text())["date"]
    except (OSError, ValueError, KeyError):
        date = Path(run_dir).name
    return _outcome_hint(Path(run_dir), date)


def _find_hint(cfg: JobConfig, date: str) -> str:
    out = run_dir(cfg, dt.date.fromisoformat(date))
    return _outcome_hint(out, date) if (out / "metrics.json").exists() else REGISTRY_HINT


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


_NOT_IN_KEY = re.compile(r"[^\w\-. :/]")


def _key(name: str) -> str:
    """MLflow takes letters, digits, '_', '-', '.', ' ', ':' and '/' in metric and parameter names;
    a key built from a user's column name (`missing_values.age (years)`) becomes `..age _years_`."""
    return _NOT_IN_KEY.sub("_", name)


def _finite(metrics: dict) -> dict[str, float]:
    return {_key(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}


def _params(params: dict) -> dict[str, str]:
    return {_key(k): str(v)[:500] for k, v in params.items()}


@dataclass(frozen=True)
class Registered:
    run_id: str
    version: str            # the date's effective version (this run's, or the winner's)
    won: bool               # False: another run registered the date first; this run's version was removed


def _date_versions(client, cfg: JobConfig, date: str) -> list:
    try:
        return client.search_model_versions(f"name='{cfg.name}' and tag.`mtrank.date`='{date}'")
    except Exception as e:  # noqa: BLE001 - a registry without the model yet
        if "RESOURCE_DOES_NOT_EXIST" in str(e):
            return []
        raise


def _generation(v) -> int:
    try:
        return int(v.tags.get("mtrank.generation", 0))
    except ValueError:
        return 0


def date_winner(versions: list):
    """The registry's agreement on a date: among the versions of the newest generation (a `--force`
    rerun starts the next one), the lowest version number. Every host computes the same answer
    from the registry alone, whatever the order in which their versions were registered."""
    if not versions:
        return None
    top = max(_generation(v) for v in versions)
    return min((v for v in versions if _generation(v) == top), key=lambda v: int(v.version))


def _log_curves(client, run_id: str, summary: dict) -> None:
    """The training curves the live run did not get (all of them when tracking was down while it
    trained): for each metric, the points after the last step the run already has."""
    import time

    from mlflow.entities import Metric

    from mtrank.jobs.live_run import epoch_metrics, step_metrics

    history = summary.get("history") or {}
    points = [(step_metrics(p), p["step"]) for p in history.get("train", [])]
    points += [(epoch_metrics(e), e.get("step", e["epoch"] + 1)) for e in summary["epochs"]]
    # train.validate_every_steps: the points inside the epochs, under the epoch ends' names
    points += [(epoch_metrics({"loss": {}, "validation": p}), p["step"])
               for p in history.get("validation_steps") or []]
    keys = {_key(k) for values, _ in points for k in values}
    last = {k: max((h.step for h in client.get_metric_history(run_id, k)), default=-1) for k in keys}
    ts = int(time.time() * 1000)
    missing = [Metric(k, float(v), ts, step) for values, step in points for k, v in _finite(values).items()
               if step > last[k]]
    for i in range(0, len(missing), 900):   # MLflow takes at most 1,000 metrics a batch
        client.log_batch(run_id, metrics=missing[i:i + 900])


def _log_model(mlflow, model_dir: Path, spec):
    """The pyfunc version: code bundled, requirements pinned, signature and input example (see
    `jobs.packaging`)."""
    import tempfile

    from mtrank.features.inputs import serving_schema
    from mtrank.jobs import packaging
    from mtrank.jobs.model_io import read_input_example, read_input_schema

    trained = read_input_schema(model_dir)
    schema = serving_schema(spec, trained)
    example = read_input_example(model_dir)
    with tempfile.TemporaryDirectory(prefix="mtrank-code-") as tmp:
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"model": str(model_dir)},
            code_paths=[str(packaging.stage_code(Path(tmp)))], pip_requirements=packaging.requirements(),
            signature=packaging.signature(spec, schema, trained),
            input_example=packaging.example_frame(example) if example is not None else None)


@_guarded("logging the training outcome", _log_hint)
def log_training(cfg: JobConfig, run_dir: Path, new_generation: bool = False, command: str = "daily") -> Registered:
    """One MLflow run for the finished training outcome in `run_dir`; registers it and, if it is the
    date's winner (`date_winner`), makes it the `challenger`; a loser deletes its version again and
    returns the winner's, so one effective version exists per job and date across hosts.
    `new_generation`: a forced retrain supersedes the date's earlier versions.

    Everything comes from the run directory (metrics.json, the saved model and its spec), so a run
    whose tracking failed is logged later exactly as it would have been.
    """
    import torch

    from mtrank.jobs.live_run import _exists, read_run_id, standard_tags

    outcome = json.loads((run_dir / "metrics.json").read_text())
    metrics = outcome.pop("tasks")
    summary = outcome
    spec = read_spec(run_dir / "model")
    mlflow, client = _client(cfg)
    exp_id = _experiment(mlflow, client, cfg)
    date = summary["date"]
    live = read_run_id(run_dir, tracking_uri(cfg))
    live = live if live is not None and _exists(client, live) else None
    tags = {**standard_tags(cfg, dt.date.fromisoformat(date), command), "mtrank.date": date, "mtrank.window": f"{summary['train_window']['start']}..{summary['train_window']['end']}",
            "mtrank.git_commit": git_commit(), "mtrank.spec_hash": spec.fingerprint()}
    lin = summary.get("lineage") or {"mode": "full", "depth": 0}
    tags.update({"mtrank.train_mode": lin["mode"], "mtrank.depth": str(lin["depth"]),
                 "mtrank.precision": summary.get("precision", cfg.train.precision)})
    if lin.get("parent_version"):
        tags.update({"mtrank.parent_version": str(lin["parent_version"]),
                     "mtrank.root_version": str(lin["root_version"])})
    run_name = f"{cfg.name}-{date}" + (f"-warm-from-v{lin['parent_version']}" if lin.get("parent_version") else "-full")
    before = _date_versions(client, cfg, date)
    generation = max((_generation(v) for v in before), default=-1) + 1 if new_generation else \
        max((_generation(v) for v in before), default=0)
    tags["mtrank.generation"] = str(generation)
    tags["mlflow.runName"] = run_name
    with mlflow.start_run(run_id=live, experiment_id=None if live else exp_id, run_name=None if live else run_name,
                          tags=tags) as run:
        params = flatten("", cfg.model_dump(mode="json"), {})
        mlflow.log_params(_params(params))
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        mlflow.log_text(spec.to_yaml(), "feature_spec.yaml")
        mlflow.log_dict({k: summary[k] for k in ("train_window", "eval_window", "rows")}, "data.json")
        rows = summary["rows"]
        mlflow.log_metrics({"rows_read": rows["read"], "rows_trained": rows["trained"],
                            "rows_rejected": rows["rejected"], "files_skipped": rows.get("files_skipped", 0),
                            "rows_sampled_out": rows.get("sampled_out", 0), "rows_held_out": rows.get("held_out", 0),
                            "eval_rows": summary["eval_rows"],
                            "train_seconds": summary["train_seconds"]})
        _log_curves(client, run.info.run_id, summary)
        flat = {}
        for task, m in metrics.items():
            flat.update({f"eval.{task}.{k}": v for k, v in m.items() if k != "population"})
        mlflow.log_metrics(_finite(flat), step=int(summary.get("global_step") or 0))  # after the last step
        mlflow.log_dict({"python": platform.python_version(), "torch": torch.__version__,
                         "mlflow": mlflow.__version__, "git_commit": tags["mtrank.git_commit"]}, "environment.json")
        if (run_dir / "report").exists():
            mlflow.log_artifacts(str(run_dir / "report"), "report")
        info = _log_model(mlflow, run_dir / "model", spec)
        run_id = run.info.run_id
    version = mlflow.register_model(info.model_uri, cfg.name, tags={
        **tags, **{f"auc.{t}": f"{m['auc']:.6f}" for t, m in metrics.items() if "auc" in m}})
    failpoint("registration")
    winner = date_winner(_date_versions(client, cfg, date))
    if winner is not None and str(winner.version) != str(version.version):
        client.delete_model_version(cfg.name, version.version)
        client.set_tag(run_id, "mtrank.superseded_by_version", str(winner.version))
        return Registered(run_id, str(winner.version), False)
    if "mtrank.root_version" not in tags:  # a full retrain roots its own chain
        client.set_model_version_tag(cfg.name, version.version, "mtrank.root_version", str(version.version))
    client.set_registered_model_alias(cfg.name, CHALLENGER, version.version)
    return Registered(run_id, str(version.version), True)


@_guarded("looking up the version registered for this date", _find_hint)
def find_version(cfg: JobConfig, date: str):
    """The date's effective version (tag mtrank.date, `date_winner`), if any run registered one."""
    _, client = _client(cfg)
    return date_winner(_date_versions(client, cfg, date))


@_guarded("reading a registry alias")
def alias_version(cfg: JobConfig, alias: str):
    _, client = _client(cfg)
    try:
        return client.get_model_version_by_alias(cfg.name, alias)
    except Exception as e:  # noqa: BLE001 - MlflowException: alias or model missing
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
            return None
        raise


def parent_for_warm_start(cfg: JobConfig, dst: Path) -> tuple[object, Path] | None:
    """(version, local model dir) of the version `warm_start.from` names, or None (first run)."""
    if cfg.warm_start.source == "none":
        return None
    v = alias_version(cfg, cfg.warm_start.source)
    if v is None:
        return None
    return v, resolve_model(f"models:/{cfg.name}/{v.version}", dst, tracking_uri(cfg))


@_guarded("reading the version lineage")
def lineage(cfg: JobConfig, start: str) -> list:
    """Versions from `start` (a version or an alias) back through mtrank.parent_version to the
    full retrain that rooted the chain (or as far as the registry still has versions)."""
    _, client = _client(cfg)
    ref = f"models:/{cfg.name}/{start}" if start.isdigit() else f"models:/{cfg.name}@{start}"
    with _registry_lookup(ref, tracking_uri(cfg)):
        v = client.get_model_version(cfg.name, start) if start.isdigit() else \
            client.get_model_version_by_alias(cfg.name, start)
    chain = [v]
    seen = {str(v.version)}
    while (parent := chain[-1].tags.get("mtrank.parent_version")) and parent not in seen:
        seen.add(parent)
        try:
            chain.append(client.get_model_version(cfg.name, parent))
        except Exception:  # noqa: BLE001 - a deleted parent ends the visible chain
            break
    return chain


@_guarded("setting the challenger alias")
def set_challenger(cfg: JobConfig, version: str) -> None:
    _client(cfg)[1].set_registered_model_alias(cfg.name, CHALLENGER, version)


@_guarded("logging the gate to the challenger's run")
def log_report_files(cfg: JobConfig, run_id: str, files: list[Path]) -> None:
    """Files of a run's report folder (re)logged under its `report/` artifacts."""
    _, client = _client(cfg)
    for f in files:
        client.log_artifact(run_id, str(f), "report")


@_guarded("recording the promotion decision")
def record_decision(cfg: JobConfig, version: str, promoted: bool, reason: str, date: str,
                    tags: dict[str, str] | None = None) -> None:
    """The decision tag goes last: a run cut off half-way has no decision, so a rerun decides again
    (the decision tag is what makes promotion idempotent). `tags`: further version tags that
    describe the decision (the gate's per-figure results), written before it."""
    _, client = _client(cfg)
    client.set_model_version_tag(cfg.name, version, "promotion.reason", reason[:4000])
    client.set_model_version_tag(cfg.name, version, "promotion.date", date)
    for key, value in (tags or {}).items():
        if key == "promotion.decision":
            raise ValueError("the decision tag is written by record_decision itself, last")
        client.set_model_version_tag(cfg.name, version, key, str(value)[:4000])
    if promoted:
        client.set_registered_model_alias(cfg.name, CHAMPION, version)
    failpoint("promotion")   # the alias may have moved, the decision is not written: a rerun decides again
    client.set_model_version_tag(cfg.name, version, "promotion.decision", "promoted" if promoted else "rejected")


def resolve_model(ref: str, dst: Path, uri: str | None = None) -> Path:
    """A saved-model directory for `ref`: a local directory as is, or an MLflow model URI
    (`models:/NAME@alias`, `models:/NAME/3`, `runs:/ID/model`) downloaded into `dst`."""
    if "://" not in ref and ":/" not in ref:
        return Path(ref)
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # job logs, not a terminal bar
    uri = require_store(uri or os.environ.get("MLFLOW_TRACKING_URI"), ref)
    ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with _reachable(uri, f"downloading {ref}", DOWNLOAD_HINT), _registry_lookup(ref, uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst))
    return Path(local) / "artifacts" / "model"


def open_model(ref: str | Path, uri: str | None = None, with_optimizer: bool = False):
    """The one way to open a model reference — a saved-model directory, `models:/NAME@alias`,
    `models:/NAME/N` or `runs:/ID/model` — as a loaded `SavedModel` (downloads go to a temporary
    directory that is gone when this returns)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mtrank-model-") as tmp:
        return load_model(resolve_model(str(ref), Path(tmp), uri), with_optimizer=with_optimizer)


def model_version_of(ref: str, uri: str) -> str | None:
    """The registry version behind `models:/NAME@alias` or `models:/NAME/N` (None for other refs)."""
    if not ref.startswith("models:/"):
        return None
    name, _, rest = ref[len("models:/"):].partition("@")
    import mlflow

    client = mlflow.MlflowClient(uri, uri)
    if rest:
        with _reachable(uri, f"resolving {ref}"), _registry_lookup(ref, uri):
            return str(client.get_model_version_by_alias(name, rest).version)
    name, _, version = name.partition("/")
    return version or None


def _job_tags(job: str, date: str) -> dict[str, str]:
    return {"mtrank.job": job, "mtrank.date": date, "mtrank.git_commit": git_commit()}


def open_job_run(cfg: JobConfig, job: str, date: str, model_ref: str, nothing: str) -> str | None:
    """Open the MLflow run of a scoring or tuning job before its work. A server that refuses this user
    (credentials, permission) stops the job here, "Nothing was <nothing>", instead of after the ranked
    lists are written; one that does not answer is tried again when the job logs (None here)."""
    uri = tracking_uri(cfg)
    tags = {**_job_tags(job, date), "mtrank.model_uri": model_ref}
    try:
        mlflow, client = _client(cfg)
        exp_id = _experiment(mlflow, client, cfg)
        return client.create_run(exp_id, run_name=f"{job}-{date}", tags=tags).info.run_id
    except MtrankError:
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException and requests' errors alike
        status = refused_status(e)
        if status is not None:
            raise TrackingRefused(f"{refusal(uri, f'opening the {job} run', status)}. Nothing was {nothing} "
                                  "(--no-track runs the job without an MLflow run).") from None
        if not (uri.startswith(("http://", "https://")) and _unreachable(e)):
            raise
        logging.getLogger("mtrank.tracking").warning(
            "MLflow is not reachable; the %s job goes on and logs its run when it ends (%s)", job,
            str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        return None


def fail_job_run(cfg: JobConfig, run_id: str | None) -> None:
    """Mark a job's open run FAILED when the job stops with an error (best effort: the error is the news)."""
    if run_id is None:
        return
    try:
        _client(cfg)[1].set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001
        pass


@contextmanager
def job_run(cfg: JobConfig, job: str, date: str, model_ref: str, nothing: str, track: bool = True):
    """The run id of a tracked job's run (None untracked, or while the server does not answer),
    opened before the work and marked FAILED if the job stops with an error."""
    run_id = open_job_run(cfg, job, date, model_ref, nothing) if track else None
    try:
        yield run_id
    except BaseException:
        fail_job_run(cfg, run_id)
        raise


def _job_run(mlflow, cfg: JobConfig, run_id: str | None, job: str, date: str, tags: dict):
    """The run opened by `open_job_run`, resumed; or a new one when the server did not answer then."""
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(tags)
        return run
    _, client = _client(cfg)
    return mlflow.start_run(experiment_id=_experiment(mlflow, client, cfg), run_name=f"{job}-{date}",
                            tags={**_job_tags(job, date), **tags})


@_guarded("logging the scoring run", lambda cfg, *_: "The ranked lists and their summary are written; "
          "only the MLflow run of this scoring job is missing.")
def log_scoring(cfg: JobConfig, date: str, model_ref: str, summary: dict, summary_path: Path,
                run_id: str | None = None) -> str:
    """One MLflow run per scoring job: rows in/out, per-rule counts, the model it used."""
    mlflow, _ = _client(cfg)
    tags = {"mtrank.model_uri": model_ref}
    if summary.get("model_version"):
        tags["mtrank.model_version"] = str(summary["model_version"])
    with _job_run(mlflow, cfg, run_id, "score", date, tags) as run:
        mlflow.log_params(_params(flatten("score", cfg.score.model_dump(mode="json"), {})))
        flat = flatten("", {k: v for k, v in summary.items() if k not in ("model_version", "files", "output")}, {})
        mlflow.log_metrics(_finite(flat))
        mlflow.log_artifact(str(summary_path))
        return run.info.run_id


@_guarded("logging the fusion tuning run")
def log_tuning(cfg: JobConfig, date: str, model_ref: str, result: dict, json_path: Path | None,
               run_id: str | None = None) -> str:
    """One MLflow run per `mtrank tune-fusion`: start and best parameters, both objectives on the
    tuning and holdout halves, and the full result (every trial) as an artifact."""
    mlflow, _ = _client(cfg)
    tags = {"mtrank.model_uri": model_ref, "mtrank.objective": f"{result['objective']}@{result['k']}"}
    if result.get("model_version"):
        tags["mtrank.model_version"] = str(result["model_version"])
    with _job_run(mlflow, cfg, run_id, "tune-fusion", date, tags) as run:
        params = {**{f"start.{k}": v for k, v in result["start"]["params"].items()},
                  **{f"best.{k}": v for k, v in result["best"]["params"].items()},
                  **{k: result[k] for k in ("objective", "k", "trials", "trial_budget", "seed", "max_rows")}}
        mlflow.log_params(_params(params))
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
