"""`mtrank promote` and `mtrank daily`: the gate from challenger to champion, and the unit a
scheduler calls (train -> evaluate -> promote), idempotent per date and locked per job."""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs import tracking
from jobs.config import JobConfig
from jobs.evaluate import evaluate_model
from jobs.model_io import load_model


class JobLocked(RuntimeError):
    pass


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    champion_before: str | None


def compare(challenger: dict, champion: dict, tolerances: dict[str, float]) -> tuple[bool, str]:
    """No worse on every gated task: challenger AUC >= champion AUC - tolerance."""
    worse, lines = [], []
    for task, tol in tolerances.items():
        if task not in challenger or task not in champion:
            continue
        a, b = challenger[task]["auc"], champion[task]["auc"]
        lines.append(f"{task} {a:.4f} vs {b:.4f} (tol {tol})")
        if not a >= b - tol:
            worse.append(task)
    verdict = "no worse on every task" if not worse else f"worse on {', '.join(worse)}"
    return not worse, verdict + ": " + "; ".join(lines)


def promote(cfg: JobConfig, date: dt.date) -> Decision:
    challenger = tracking.alias_version(cfg, tracking.CHALLENGER)
    if challenger is None:
        raise RuntimeError(f"model {cfg.name!r} has no '{tracking.CHALLENGER}' version to promote")
    if challenger.tags.get("promotion.decision"):
        return Decision(challenger.version, challenger.tags["promotion.decision"] == "promoted",
                        challenger.tags.get("promotion.reason", ""), None)  # decided before: idempotent
    champion = tracking.alias_version(cfg, tracking.CHAMPION)
    if champion is None:
        reason = "first version: no champion to compare with"
        tracking.record_decision(cfg, challenger.version, True, reason, date.isoformat())
        return Decision(challenger.version, True, reason, None)
    with tempfile.TemporaryDirectory() as tmp:
        evals = {}
        for label, mv in (("challenger", challenger), ("champion", champion)):
            saved = load_model(tracking.download_saved_model(cfg, mv.version, Path(tmp) / label))
            evals[label] = evaluate_model(saved, cfg.data, date, cfg.promote.max_rows)[0].metrics
    ok, reason = compare(evals["challenger"], evals["champion"], cfg.promote.tolerances)
    reason = f"on {date} vs champion v{champion.version}: {reason}"
    tracking.record_decision(cfg, challenger.version, ok, reason, date.isoformat())
    return Decision(challenger.version, ok, reason, champion.version)


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
