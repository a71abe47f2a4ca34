"""Where a job keeps its files: one place, so tracking, training and promotion agree without
importing each other."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from jobs.config import JobConfig


def run_dir(cfg: JobConfig, date: dt.date) -> Path:
    """The directory of the run for `date`: metrics.json, model/, report/, checkpoints."""
    return Path(cfg.work_dir) / "runs" / cfg.name / date.isoformat()
