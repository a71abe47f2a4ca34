"""`mtrank daily`: the unit a scheduler calls — train -> register -> promote for one date.

Idempotent per date: a date that already has a registered version reuses it (tag `mtrank.date`);
a training outcome that finished but was never logged is logged from its run directory instead of
retrained; an interrupted training resumes from its checkpoint. One run per job at a time.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs import tracking
from jobs.config import JobConfig
from jobs.promote import Decision, promote
from jobs.train import run_dir, train


class JobLocked(RuntimeError):
    pass


@dataclass
class DailyOutcome:
    version: str
    how: str            # "reused" | "logged" (outcome on disk, tracking had failed) | "trained"
    run_id: str | None
    run_dir: Path
    decision: Decision


@contextmanager
def job_lock(cfg: JobConfig, wait: bool = False):
    """One `daily` per job name at a time (flock: released by the OS if the process dies)."""
    path = Path(cfg.work_dir) / "locks" / f"{cfg.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise JobLocked(f"another 'mtrank daily' for {cfg.name!r} is running (lock {path}); "
                            "this run exits without doing anything") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def run_daily(cfg: JobConfig, date: dt.date, force: bool = False, wait: bool = False) -> DailyOutcome:
    with job_lock(cfg, wait=wait):
        out_dir = run_dir(cfg, date)
        existing = None if force else tracking.find_version(cfg, date.isoformat())
        run_id = None
        if existing is not None:
            version, how = existing.version, "reused"
            if not existing.tags.get("promotion.decision"):
                tracking.set_challenger(cfg, version)
        else:
            how = "logged" if (out_dir / "metrics.json").exists() and not force else "trained"
            if how == "trained":
                train(cfg, date, resume=not force)
            run_id, version = tracking.log_training(cfg, out_dir)
        return DailyOutcome(version, how, run_id, out_dir, promote(cfg, date))
