"""`mtrank promote`: the gate from challenger to champion, decided on one held-out day."""
from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jobs import tracking
from jobs.config import JobConfig
from jobs.evaluate import evaluate_model
from jobs.model_io import load_model


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
            ref = f"models:/{cfg.name}/{mv.version}"
            saved = load_model(tracking.resolve_model(ref, Path(tmp) / label, tracking.tracking_uri(cfg)))
            evals[label] = evaluate_model(saved, cfg.data, date, cfg.promote.max_rows,
                                          quarantine_dir=cfg.quarantine_dir,
                                          on_unreadable=cfg.on_unreadable_file)[0].metrics
    ok, reason = compare(evals["challenger"], evals["champion"], cfg.promote.tolerances)
    reason = f"on {date} vs champion v{champion.version}: {reason}"
    tracking.record_decision(cfg, challenger.version, ok, reason, date.isoformat())
    return Decision(challenger.version, ok, reason, champion.version)
