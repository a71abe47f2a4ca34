"""Where a job keeps its files: one place, so tracking, training and promotion agree without
importing each other."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from mtrank.jobs.config import JobConfig


def quarantine_dir(cfg: JobConfig, stage: str) -> Path:
    """Where a stage sets bad rows aside when a spec or config says quarantine: the job's
    quarantine_dir, else work_dir/quarantine; one subfolder per stage."""
    return Path(cfg.quarantine_dir or Path(cfg.work_dir) / "quarantine") / stage


def run_dir(cfg: JobConfig, date: dt.date) -> Path:
    """The directory of the run for `date`: metrics.json, model/, report/, checkpoints."""
    return Path(cfg.work_dir) / "runs" / cfg.name / date.isoformat()
