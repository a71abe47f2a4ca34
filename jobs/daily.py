"""`mtrank daily`: the unit a scheduler calls — train -> register -> promote for one date.

Idempotent per date: a date that already has a registered version reuses it (tag `mtrank.date`);
a training outcome that finished but was never logged is logged from its run directory instead of
retrained; an interrupted training resumes from its checkpoint. One run per job at a time.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs import tracking
from jobs.config import JobConfig
from jobs.promote import Decision, promote
from jobs.model_io import load_model
from jobs.train import Parent, run_dir, train


log = logging.getLogger("mtrank.daily")


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


def _parent(cfg: JobConfig, dst: Path) -> Parent | None:
    found = tracking.parent_for_warm_start(cfg, dst)
    if found is None:
        return None
    v, path = found
    return Parent(str(v.version), load_model(path, with_optimizer=True),
                  root_version=v.tags.get("mtrank.root_version", str(v.version)),
                  depth=int(v.tags.get("mtrank.depth", 0)), source=cfg.warm_start.source)


def run_daily(cfg: JobConfig, date: dt.date, force: bool = False, wait: bool = False,
              full: bool = False) -> DailyOutcome:
    """`full`: retrain from scratch on the window even where the config warm-starts (e.g. weekly)."""
    with job_lock(cfg, wait=wait):
        out_dir = run_dir(cfg, date)
        known = True
        try:
            existing = None if force else tracking.find_version(cfg, date.isoformat())
        except tracking.TrackingUnavailable as e:  # train anyway: the outcome waits on disk for the server
            log.warning("%s. Training anyway: the outcome is kept in %s", str(e).split(". ")[0], out_dir)
            existing, known = None, False
        run_id = None
        if existing is not None:
            version, how = existing.version, "reused"
            if not existing.tags.get("promotion.decision"):
                tracking.set_challenger(cfg, version)
        else:
            how = "logged" if (out_dir / "metrics.json").exists() and not force else "trained"
            if how == "trained":
                with tempfile.TemporaryDirectory(prefix="mtrank-parent-") as tmp:
                    parent = None if full else _parent(cfg, Path(tmp))
                    train(cfg, date, resume=not force, parent=parent)
            found = None if known else tracking.find_version(cfg, date.isoformat())  # ask again before registering
            if found is not None:  # the registry had this date after all: never a second version
                version, how = found.version, "reused"
                if not found.tags.get("promotion.decision"):
                    tracking.set_challenger(cfg, version)
            else:
                run_id, version = tracking.log_training(cfg, out_dir)
        return DailyOutcome(version, how, run_id, out_dir, promote(cfg, date))
