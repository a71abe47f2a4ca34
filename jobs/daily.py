"""`mtrank daily`: the unit a scheduler calls — train -> register -> promote for one date.

Idempotent per date: a date that already has a registered version reuses it (tag `mtrank.date`);
a training outcome that finished but was never logged is logged from its run directory instead of
retrained; an interrupted training resumes from its checkpoint. One run per job at a time.
"""
from __future__ import annotations

from mtrank.features.base import MtrankError, failpoint

import datetime as dt
import fcntl
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mtrank.jobs import tracking
from mtrank.jobs.config import JobConfig, absolute_paths
from mtrank.jobs.promote import Decision, promote
from mtrank.jobs.model_io import load_model
from mtrank.jobs.paths import run_dir
from mtrank.jobs.train import Parent, train
from mtrank.pipeline.trainer import ResumeMismatchError


log = logging.getLogger("mtrank.daily")


class JobLocked(MtrankError, RuntimeError):
    pass


class TrainingFailed(MtrankError, RuntimeError):
    """A data-parallel training step of `daily` did not finish (the failing rank printed why)."""


@dataclass
class DailyOutcome:
    version: str
    how: str            # "reused" | "logged" (outcome on disk, tracking had failed) | "trained" | "lost"
    run_id: str | None
    run_dir: Path
    decision: Decision | None   # None when another run registered the date first (it promotes)


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
                  depth=int(v.tags.get("mtrank.depth", 0)), source=cfg.warm_start.source, path=Path(path))


@contextmanager
def daily_remedy():
    """A checkpoint the daily's own resume may not continue from: the remedy is `--force`, since the
    daily, not the user, asked to resume (`mtrank train`'s advice, "start without --resume", does
    not apply to it)."""
    try:
        yield
    except ResumeMismatchError as e:
        raise ResumeMismatchError(e.problem, "refusing to resume (a daily resumes its date's interrupted "
                                  "training by itself; rerun it with --force to train the date from scratch)") from None


def _train_ranks(cfg: JobConfig, date: dt.date, parent: Parent | None, resume: bool, nproc: int, tmp: Path) -> None:
    """The training step as `nproc` torchrun ranks: `mtrank train` with this job's config (paths made
    absolute) and the parent this process found; the outcome lands in the run directory as usual."""
    import yaml

    from mtrank.jobs.launch import torchrun

    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(absolute_paths(cfg).model_dump(mode="json", by_alias=True)))
    argv = ["train", "--config", str(job), "--date", date.isoformat(), "--no-track", "--nproc", str(nproc),
            "--for-daily"]
    if resume:
        argv.append("--resume")
    if parent is not None:
        (tmp / "parent.json").write_text(json.dumps(
            {"version": parent.version, "dir": str(parent.path), "root_version": parent.root_version,
             "depth": parent.depth, "source": parent.source}))
        argv += ["--parent", str(tmp / "parent.json")]
    rc = torchrun(nproc, argv)
    if rc != 0:
        raise TrainingFailed(f"training on {nproc} ranks failed (torchrun exit status {rc}; the failing rank's "
                             f"error is above); nothing was registered. A rerun resumes from the last checkpoint "
                             f"in {run_dir(cfg, date) / 'checkpoints'}")


def load_parent(path: str | Path) -> Parent:
    """The parent a `daily` process handed to its training ranks (see `_train_ranks`)."""
    p = json.loads(Path(path).read_text())
    return Parent(p["version"], load_model(p["dir"], with_optimizer=True), root_version=p["root_version"],
                  depth=p["depth"], source=p["source"], path=Path(p["dir"]))


def run_daily(cfg: JobConfig, date: dt.date, force: bool = False, wait: bool = False,
              full: bool = False, nproc: int = 1) -> DailyOutcome:
    """`full`: retrain from scratch on the window even where the config warm-starts (e.g. weekly).
    `nproc` > 1: the training step runs as that many data-parallel ranks (torchrun)."""
    cfg.train.check_ranks(nproc)   # before the lock, the registry and any rank
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
                    if nproc > 1:
                        _train_ranks(cfg, date, parent, not force, nproc, Path(tmp))
                    else:
                        with daily_remedy():
                            train(cfg, date, resume=not force, parent=parent, track=True, command="daily")
                failpoint("after_training")
            found = None if known else tracking.find_version(cfg, date.isoformat())  # ask again before registering
            if found is not None:  # the registry had this date after all: never a second version
                version, how = found.version, "reused"
                if not found.tags.get("promotion.decision"):
                    tracking.set_challenger(cfg, version)
            else:
                reg = tracking.log_training(cfg, out_dir, new_generation=force)
                run_id, version = reg.run_id, reg.version
                if not reg.won:   # another host registered this date first: its run promotes
                    return DailyOutcome(version, "lost", run_id, out_dir, None)
        return DailyOutcome(version, how, run_id, out_dir, promote(cfg, date))
