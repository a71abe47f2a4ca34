"""Job configuration: one strict YAML document per scheduled job.

Unknown keys anywhere are errors naming the key path, so a typo never silently falls back to a
default. Paths are data, resolved against the config file's directory when relative; URIs
(`s3://bucket/logs`) are left as they are.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from mtrank.features.base import StrictConfig
from mtrank.features.spec import SpecError, read_yaml
from mtrank.features.storage import is_uri
from mtrank.models import ModelConfig
from mtrank.pipeline.scoring.config import ScoringConfig
from mtrank.pipeline.trainer import TrainConfig

DEFAULT_JOB = "default_job.yaml"


class EvalConfig(StrictConfig):

    max_rows: int | None = Field(default=None, gt=0, description="evaluate on the first N rows of the day")
    batch_size: int = Field(default=16_384, gt=0, description="rows per prediction batch")


class PromoteConfig(StrictConfig):
    """The gate a challenger passes to become champion (decision rule: jobs/promote.py).

    Every binary task and entire-space product of the challenger's spec is gated, paired on the
    same rows of the evaluation day: a figure fails when the challenger's AUC is lower than the
    champion's by more than its tolerance with `confidence` (DeLong's test, one-sided). Names in
    `tolerances` and `skip` are checked against the model's figures when the gate runs (this
    config cannot know the spec): an unknown name is an error listing the valid ones.
    """

    tolerance: float = Field(default=0.002, ge=0.0, le=1.0, description="AUC drop allowed on every gated "
                             "task/product unless `tolerances` names it")
    tolerances: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict, description="per-task/product tolerance overrides")
    skip: list[str] = Field(default_factory=list, description="tasks/products left out of the gate, explicitly")
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0, description="one-sided confidence with which a "
                              "figure must be shown worse than its tolerance to fail")
    max_rows: int | None = Field(default=None, gt=0, description="evaluate on the first N rows of the day")

    @model_validator(mode="after")
    def _skip_xor_tolerance(self) -> "PromoteConfig":
        both = sorted(set(self.skip) & set(self.tolerances))
        if both:
            raise ValueError(f"{', '.join(both)}: both skipped and given a tolerance; choose one")
        return self


class TrackingConfig(StrictConfig):
    """How hard to try the tracking server before giving up (applied to MLflow's HTTP client:
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT, jitter 0). Each request is tried
    1 + retries times, waiting 0, 2·b, 4·b, … seconds between tries (urllib3's exponential backoff
    with factor b = backoff_seconds); a request gets timeout_seconds to connect and to answer."""

    retries: int = Field(default=3, ge=0, le=10, description="retries per request after the first try")
    backoff_seconds: int = Field(default=1, ge=0, le=120, description="backoff factor (doubling)")
    timeout_seconds: int = Field(default=30, gt=0, le=3600, description="per request")


JOB_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class WarmStartConfig(StrictConfig):
    """Daily increments: continue from a registered version and train on the newest day(s) only.

    `from: none` (or no such version yet, or `mtrank daily --full`) trains from scratch on the
    window. Numeric statistics: `running` merges the new days' moments into the parent's (exact
    running moments since the last full retrain: each day moves the standardisation by O(1/days));
    `frozen` keeps the parent's, so inputs keep exactly their meaning until the next full retrain.
    """
    model_config = ConfigDict(**StrictConfig.model_config, populate_by_name=True)

    source: Literal["champion", "challenger", "none"] = Field(default="none", alias="from", description="the "
                                                               "registered alias to continue; none: train from scratch")
    days: int = Field(default=1, gt=0, description="train on [D - days, D - 1] when warm-starting")
    reinit_changed_tables: bool = Field(default=False, description="re-initialise tables whose buckets or hash "
                                        "seed changed instead of refusing the warm start")
    numeric_stats: Literal["running", "frozen"] = Field(default="running", description="running: merge the new "
                                                        "days' moments into the parent's; frozen: keep the parent's")


class JobConfig(StrictConfig):

    name: str = Field(default="mtrank-ranker", min_length=1, max_length=128, description="registered model "
                      "name; also names run directories and the lock file, so it must be a plain file name")
    data: str = Field(description="root of the day folders of impression logs (dt=YYYY-MM-DD/, ds=YYYYMMDD/, …)")
    spec: str | None = Field(default=None, description="FeatureSpec YAML; null = the embedded default")
    window_days: int = Field(default=7, gt=0, description="train on [D - window_days, D - 1], evaluate on D")
    work_dir: str = Field(default=".mtrank/work", description="run directories, checkpoints, locks and the "
                          "default sqlite MLflow store")
    tracking_uri: str | None = Field(default=None, description="MLflow URI; default $MLFLOW_TRACKING_URI, "
                                     "else sqlite in work_dir")
    artifact_location: str | None = Field(default=None, description="where the job's MLflow experiment keeps "
                                          "run artifacts and model files (e.g. s3://bucket/mlflow; needs the `s3` "
                                          "extra and MLFLOW_S3_ENDPOINT_URL for a non-AWS endpoint); fixed when the "
                                          "experiment is created, so it applies to a new experiment only; default: "
                                          "work_dir/mlartifacts for the embedded sqlite store, else the server's")
    quarantine_dir: str | None = Field(default=None, description="where rejected rows go under on_bad_row: "
                                       "quarantine (one subfolder per stage); null = work_dir/quarantine")
    on_unreadable_file: Literal["fail", "skip"] = Field(default="fail", description="a corrupt or "
                                                   "truncated Parquet file: fail naming it, or skip it (counted, logged, reported)")
    tracking: TrackingConfig = Field(default=TrackingConfig(), description="retries and timeouts of MLflow requests")
    model: ModelConfig = Field(default=ModelConfig(), description="architecture: bottom, experts, towers, ESMM")
    train: TrainConfig = Field(default=TrainConfig(), description="optimisation, precision, device, checkpoints")
    eval: EvalConfig = Field(default=EvalConfig(), description="evaluation on the --date day after training")
    promote: PromoteConfig = Field(default=PromoteConfig(), description="the gate from challenger to champion")
    score: ScoringConfig = Field(default=ScoringConfig(), description="fusion and business rules of `mtrank "
                                 "score`, objectives of `mtrank tune-fusion`")
    warm_start: WarmStartConfig = Field(default=WarmStartConfig(), description="daily increments from a "
                                        "registered version")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.match(JOB_NAME, v) or ".." in v:
            raise ValueError(f"{v!r} is not a plain name (letters, digits, '.', '_', '-'; starting with a letter "
                             "or digit; no '..'): it names run directories, the lock file and the registered model")
        return v


def _resolve(cfg: JobConfig, base: Path | None) -> JobConfig:
    if base is None:
        return cfg
    fix = lambda p: p if p is None or is_uri(p) or Path(p).is_absolute() else str(base / p)  # noqa: E731
    s = cfg.score
    score = s.model_copy(update={
        "traffic_cap": s.traffic_cap.model_copy(update={"caps_file": fix(s.traffic_cap.caps_file),
                                                        "exposures_file": fix(s.traffic_cap.exposures_file)}),
        "campaign": s.campaign.model_copy(update={"items_file": fix(s.campaign.items_file)})})
    return cfg.model_copy(update={"data": fix(cfg.data), "spec": fix(cfg.spec), "work_dir": fix(cfg.work_dir),
                                  "quarantine_dir": fix(cfg.quarantine_dir), "score": score})


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """The same job with every path absolute (relative ones are relative to the current directory),
    so that it can be written elsewhere and read back unchanged."""
    return _resolve(cfg, Path.cwd())


def parse_config(raw: object, source: str, base: Path | None = None) -> JobConfig:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job config is a mapping, got {type(raw).__name__}")
    try:
        return _resolve(JobConfig.model_validate(raw), base)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{loc}: {msg}")
        raise SpecError(f"{source}: invalid job config: " + "; ".join(lines)) from None


def load_config(path: str | Path | None = None, **overrides: object) -> JobConfig:
    """The YAML at `path` (relative paths inside resolve against its folder), or the embedded
    default job (paths relative to the current directory). `overrides` replace top-level keys; a
    relative path among them is relative to the current directory."""
    raw, source, base = read_yaml(path, "jobs", DEFAULT_JOB, "job config")
    if isinstance(raw, dict):
        raw.update({k: _from_here(k, v) for k, v in overrides.items() if v is not None})
    return parse_config(raw, source, base)


PATH_KEYS = ("data", "spec", "work_dir", "quarantine_dir")


def _from_here(key: str, value: object) -> object:
    """A path given on the command line is relative to the current directory, not to the YAML's
    folder (where the file's own relative paths resolve)."""
    if key in PATH_KEYS and isinstance(value, str) and not is_uri(value) and not Path(value).is_absolute():
        return str(Path.cwd() / value)
    return value
