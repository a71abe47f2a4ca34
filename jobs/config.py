"""Job configuration: one strict YAML document per scheduled job.

Unknown keys anywhere are errors naming the key path, so a typo never silently falls back to a
default. Paths are data, resolved against the config file's directory when relative.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from features.spec import SpecError, read_yaml
from models import ModelConfig
from pipeline.scoring.config import ScoringConfig
from pipeline.trainer import TrainConfig

DEFAULT_JOB = "default_job.yaml"


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rows: int | None = Field(default=None, gt=0, description="evaluate on the first N rows of the day")
    batch_size: int = Field(default=16_384, gt=0)


class PromoteConfig(BaseModel):
    """The gate a challenger passes to become champion: per-task AUC may drop at most this much."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerances: dict[str, float] = Field(default_factory=lambda: {
        "ctr": 0.002, "ctcvr": 0.003, "cvr": 0.005, "collect": 0.005, "cart": 0.005})
    max_rows: int | None = Field(default=None, gt=0, description="evaluate on the first N rows of the day")


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="mtrank-ranker", min_length=1, description="registered model name")
    data: str = Field(description="root of dt=YYYY-MM-DD/ impression partitions")
    spec: str | None = Field(default=None, description="FeatureSpec YAML; null = the embedded default")
    window_days: int = Field(default=7, gt=0, description="train on [D - window_days, D - 1], evaluate on D")
    work_dir: str = ".mtrank/work"
    tracking_uri: str | None = Field(default=None, description="MLflow URI; default $MLFLOW_TRACKING_URI, "
                                     "else sqlite in work_dir")
    quarantine_dir: str | None = None
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    promote: PromoteConfig = PromoteConfig()
    score: ScoringConfig = ScoringConfig()


def _resolve(cfg: JobConfig, base: Path | None) -> JobConfig:
    if base is None:
        return cfg
    fix = lambda p: p if p is None or Path(p).is_absolute() else str(base / p)  # noqa: E731
    s = cfg.score
    score = s.model_copy(update={
        "traffic_cap": s.traffic_cap.model_copy(update={"caps_file": fix(s.traffic_cap.caps_file),
                                                        "exposures_file": fix(s.traffic_cap.exposures_file)}),
        "campaign": s.campaign.model_copy(update={"items_file": fix(s.campaign.items_file)})})
    return cfg.model_copy(update={"data": fix(cfg.data), "spec": fix(cfg.spec), "work_dir": fix(cfg.work_dir),
                                  "quarantine_dir": fix(cfg.quarantine_dir), "score": score})


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
    default job (paths relative to the current directory). `overrides` replace top-level keys."""
    raw, source, base = read_yaml(path, "jobs", DEFAULT_JOB, "job config")
    if isinstance(raw, dict):
        raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(raw, source, base)
