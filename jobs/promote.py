"""`mtrank promote`: the gate from challenger to champion, decided on one held-out day.

Decision rule (`promote:` in the job config)
--------------------------------------------
The gate compares every binary task (on its own population) and every entire-space product (on
its parent's population) of the challenger's spec, as `pipeline.evaluate.binary_sets` lists them;
no task name is built in. Both models predict the same rows of the evaluation day, so each
figure is a paired comparison: delta = AUC_challenger - AUC_champion, with DeLong's standard error
for two correlated AUCs (`pipeline.metrics.paired_auc_test`).

* A figure FAILS when the challenger is worse than its tolerance with the configured confidence:
  the one-sided upper confidence bound delta + z·se lies below -tolerance, z = Φ⁻¹(confidence)
  (1.645 at 0.95). Otherwise it passes: a drop the day's data cannot tell from noise (or one
  within the tolerance) does not reject a version.
* The challenger is PROMOTED when no figure fails and every figure is defined.
* A figure whose AUC is undefined (no positives or no negatives on the day; fewer than two, so no
  variance; non-finite scores) lets the gate vouch for nothing there: the version is recorded
  "rejected" with the reason "undefined AUC on <figure> (...)". Opt the figure out with `skip`.
* tolerance: `promote.tolerances[<figure>]`, else `promote.tolerance` (default 0.002).
  `promote.skip` leaves figures out explicitly; names in either that are not figures of the
  challenger's spec are an error naming them and listing the valid ones.
* A gate that would compare nothing (no binary task, everything skipped, or no figure in common
  with the champion) is an error, never a silent promotion. Figures of one model only are named
  in the reason as not comparable.
* Each figure is tested on its own at `confidence` (no multiplicity correction): with K figures
  of an unchanged model, a false rejection needs one figure to look worse than its tolerance by
  chance; with a tolerance above zero that is rarer than 1 - confidence per figure.

The reason (printed by the CLI, tag `promotion.reason`) carries every figure's delta, its
two-sided interval and the one-sided bound; per-figure version tags `gate.<figure>.delta`,
`.ci`, `.bound`, `.outcome` and `promotion.rule` record the same; `gate.json` and a gate section
of report.html land in the challenger's report folder when that folder is on this machine, and are
logged to the challenger's MLflow run. There the challenger's report.html is re-rendered with the
champion as its baseline (both scored on the gate's rows): metrics with deltas, the champion's
curves in the ROC and reliability plots, then the gate section.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np

from mtrank.features.spec import SpecError
from mtrank.jobs import tracking
from mtrank.jobs.config import JobConfig, PromoteConfig
from mtrank.jobs.evaluate import Evaluation, evaluate_model
from mtrank.jobs.paths import quarantine_dir, run_dir
from mtrank.jobs.report import add_gate, compare_report
from mtrank.pipeline.evaluate import BinarySet, binary_sets
from mtrank.pipeline.metrics import paired_auc_test

Outcome = Literal["pass", "fail", "undefined"]


class GateError(SpecError):
    """The gate cannot be run as configured (reported like a config error: nothing is recorded,
    the challenger stays undecided and a rerun decides it)."""


@dataclass(frozen=True)
class FigureResult:
    """One gated figure: both AUCs on the same rows, their difference and its intervals."""

    name: str
    population: str
    positives: int
    negatives: int
    auc_challenger: float
    auc_champion: float
    delta: float            # challenger - champion
    se: float
    ci_lower: float         # two-sided interval at the gate's confidence
    ci_upper: float
    bound: float            # one-sided upper confidence bound: fails when below -tolerance
    tolerance: float
    outcome: Outcome
    note: str = ""          # why undefined

    def line(self) -> str:
        if self.outcome == "undefined":
            return f"{self.name} undefined AUC ({self.note}) -> undefined"
        verdict = "FAIL" if self.outcome == "fail" else "pass"
        return (f"{self.name} {self.auc_challenger:.4f} vs {self.auc_champion:.4f} {self.delta:+.4f} "
                f"[{self.ci_lower:+.4f}, {self.ci_upper:+.4f}] bound {self.bound:+.4f} tol {self.tolerance:g} "
                f"-> {verdict}")


@dataclass(frozen=True)
class Gate:
    promoted: bool
    verdict: str
    reason: str
    rule: str
    confidence: float
    figures: tuple[FigureResult, ...]
    skipped: tuple[str, ...] = ()
    not_comparable: dict[str, str] = field(default_factory=dict)   # name -> "challenger only" | "champion only"

    def tags(self) -> dict[str, str]:
        """Version tags: per figure delta, interval, bound and outcome; the rule in one line."""
        out = {}
        for f in self.figures:
            out[f"gate.{f.name}.delta"] = _num(f.delta)
            out[f"gate.{f.name}.ci"] = f"[{_num(f.ci_lower)}, {_num(f.ci_upper)}]"
            out[f"gate.{f.name}.bound"] = _num(f.bound)
            out[f"gate.{f.name}.outcome"] = f.outcome
        out["promotion.rule"] = self.rule
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["figures"] = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in f.items()}
                        for f in d["figures"]]
        return d


def _num(v: float) -> str:
    return f"{v:.6f}" if math.isfinite(v) else "nan"


def rule_text(cfg: PromoteConfig) -> str:
    """The decision rule with this job's numbers, in one line (tag `promotion.rule`)."""
    z = NormalDist().inv_cdf(cfg.confidence)
    over = ", ".join(f"{k} {v:g}" for k, v in sorted(cfg.tolerances.items()))
    return (f"every binary task/product, paired on the same rows: fail when AUC_challenger - AUC_champion "
            f"+ {z:.3f}*se(DeLong) < -tol (one-sided {cfg.confidence * 100:g}%); tol {cfg.tolerance:g}"
            + (f" ({over})" if over else "") + (f"; skipped: {', '.join(cfg.skip)}" if cfg.skip else "")
            + "; promoted when no figure fails and every AUC is defined")


def check_names(figures: Mapping[str, object], cfg: PromoteConfig) -> None:
    """Names in `promote.tolerances` / `promote.skip` must be figures of the model's spec."""
    valid = list(figures)
    for key, names in (("tolerances", list(cfg.tolerances)), ("skip", cfg.skip)):
        unknown = [n for n in names if n not in figures]
        if unknown:
            raise GateError(f"promote.{key} names {', '.join(map(repr, unknown))}, not a binary task or "
                            f"entire-space product of the challenger's spec; valid: {', '.join(valid) or '(none)'}")


def _paired(name: str, a: BinarySet, b: BinarySet) -> None:
    if a.label.shape != b.label.shape or not np.array_equal(np.asarray(a.label) > 0, np.asarray(b.label) > 0):
        raise GateError(f"{name}: the challenger and the champion were not evaluated on the same rows "
                        f"({a.label.size:,} vs {b.label.size:,} rows, {int((np.asarray(a.label) > 0).sum()):,} vs "
                        f"{int((np.asarray(b.label) > 0).sum()):,} positives); the gate pairs them row by row. "
                        "Do the two specs define this figure's population or label differently?")


def _figure(name: str, a: BinarySet, b: BinarySet, tol: float, confidence: float) -> FigureResult:
    _paired(name, a, b)
    y = np.asarray(a.label) > 0
    pos, neg = int(y.sum()), int(y.size - y.sum())
    nan = float("nan")
    bad = [who for who, s in (("challenger", a.score), ("champion", b.score)) if not np.isfinite(s).all()]
    if bad:
        return FigureResult(name, a.population, pos, neg, nan, nan, nan, nan, nan, nan, nan, tol, "undefined",
                            f"non-finite scores from the {' and the '.join(bad)}")
    r = paired_auc_test(a.score, b.score, y, confidence)
    if not r.defined:
        why = "no AUC" if pos == 0 or neg == 0 else "no variance"
        return FigureResult(name, a.population, pos, neg, r.auc_a, r.auc_b, r.delta, nan, nan, nan, nan, tol,
                            "undefined", f"{pos:,} positives, {neg:,} negatives: {why}")
    outcome: Outcome = "fail" if r.bound < -tol else "pass"
    return FigureResult(name, a.population, pos, neg, r.auc_a, r.auc_b, r.delta, r.se, r.lower, r.upper, r.bound,
                        tol, outcome)


def compare(challenger: Mapping[str, BinarySet], champion: Mapping[str, BinarySet], cfg: PromoteConfig) -> Gate:
    """The gate on two models' binary figures (`binary_sets` of each, same rows of one day).

    Raises GateError when the config names unknown figures, when nothing would be compared, or
    when a figure's rows differ between the two models.
    """
    check_names(challenger, cfg)
    if not challenger:
        raise GateError("the challenger's spec has no binary task: the gate would compare nothing")
    gated = [n for n in challenger if n not in cfg.skip]
    if not gated:
        raise GateError(f"promote.skip leaves no figure to compare (skipped: {', '.join(cfg.skip)}); "
                        "a gate that compares nothing is not a gate")
    missing = {n: "challenger only" for n in gated if n not in champion}
    missing.update({n: "champion only" for n in champion if n not in challenger})
    common = [n for n in gated if n in champion]
    if not common:
        raise GateError(f"the champion has none of the challenger's gated figures ({', '.join(gated)}; champion: "
                        f"{', '.join(champion) or 'none'}): nothing to compare")
    figures = tuple(_figure(n, challenger[n], champion[n], cfg.tolerances.get(n, cfg.tolerance), cfg.confidence)
                    for n in common)
    worse = [f.name for f in figures if f.outcome == "fail"]
    undefined = [f for f in figures if f.outcome == "undefined"]
    parts = []
    if worse:
        parts.append(f"worse on {', '.join(worse)}")
    if undefined:
        parts.append("undefined AUC on " + ", ".join(f"{f.name} ({f.note})" for f in undefined))
    promoted = not parts
    c = f"{cfg.confidence * 100:g} %"
    verdict = "; ".join(parts) if parts else (f"not worse beyond tolerance at {c} on "
                                              + ("the one figure" if len(figures) == 1 else f"all {len(figures)} figures"))
    notes = [f"delta = challenger - champion [{c} CI], bound = one-sided {c} upper bound, fail when bound < -tol"]
    if cfg.skip:
        notes.append(f"skipped: {', '.join(cfg.skip)}")
    if missing:
        notes.append("not comparable: " + ", ".join(f"{n} ({w})" for n, w in missing.items()))
    reason = f"{verdict}: " + "; ".join(f.line() for f in figures) + " (" + "; ".join(notes) + ")"
    return Gate(promoted, verdict, reason, rule_text(cfg), cfg.confidence, figures, tuple(cfg.skip), missing)


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    gate: Gate | None = None
    decided_before: bool = False   # the challenger's decision was recorded by an earlier run: nothing evaluated


def _write_gate_json(cfg: JobConfig, challenger, payload: dict, evals: dict[str, Evaluation] | None = None,
                     champion_version: str | None = None) -> Path | None:
    """gate.json and the gate's section of report.html in the challenger's report folder (when its run
    directory is on this machine), both also logged to the challenger's MLflow run. With `evals`
    (both models scored on the gate's rows) the report is re-rendered with the champion as its
    baseline: table with deltas, champion's curves in the plots, then the gate section."""
    day = challenger.tags.get("mtrank.date")
    if not day:
        return None
    report = run_dir(cfg, dt.date.fromisoformat(day)) / "report"
    if not report.is_dir():
        return None
    if evals:
        cha, chm = evals["challenger"], evals["champion"]
        meta = {"baseline": f"champion v{champion_version}, scored on the same {cha.rows:,} rows of "
                            f"{payload['date']} as this model (the gate's evaluation)",
                "evaluation rows": cha.rows}
        files = compare_report(report, cha.metrics, cha.curves, chm.metrics, chm.curves,
                               (f"challenger v{challenger.version}", f"champion v{champion_version}"), payload, meta)
    else:
        files = add_gate(report, payload)
    if getattr(challenger, "run_id", None):
        tracking.log_report_files(cfg, challenger.run_id, files)
    return report / "gate.json"


def promote(cfg: JobConfig, date: dt.date) -> Decision:
    challenger = tracking.alias_version(cfg, tracking.CHALLENGER)
    if challenger is None:
        raise GateError(f"model {cfg.name!r} has no '{tracking.CHALLENGER}' version to promote (run "
                        "`mtrank daily` or `mtrank train` first)")
    if challenger.tags.get("promotion.decision"):
        return Decision(challenger.version, challenger.tags["promotion.decision"] == "promoted",
                        challenger.tags.get("promotion.reason", ""), None, decided_before=True)  # idempotent
    champion = tracking.alias_version(cfg, tracking.CHAMPION)
    head = {"date": date.isoformat(), "challenger_version": str(challenger.version)}
    if champion is None:
        reason = "first version: no champion to compare with"
        _write_gate_json(cfg, challenger, {**head, "champion_version": None, "promoted": True, "reason": reason,
                                           "rule": rule_text(cfg.promote), "figures": []})
        tracking.record_decision(cfg, challenger.version, True, reason, date.isoformat(),
                                 {"promotion.rule": rule_text(cfg.promote)})
        return Decision(challenger.version, True, reason, None)
    sets, rows, evals = {}, {}, {}
    for label, mv in (("challenger", challenger), ("champion", champion)):
        saved = tracking.open_model(f"models:/{cfg.name}/{mv.version}", tracking.tracking_uri(cfg))
        evals[label], pred = evaluate_model(saved, cfg.data, date, cfg.promote.max_rows,
                                            quarantine_dir=quarantine_dir(cfg, "promote"),
                                            on_unreadable=cfg.on_unreadable_file)
        sets[label], rows[label] = binary_sets(pred, saved.spec), pred.rows
        del pred, saved
        if label == "challenger":
            check_names(sets[label], cfg.promote)  # a misnamed figure fails before the second evaluation
    if rows["challenger"] != rows["champion"]:
        raise GateError(f"the challenger read {rows['challenger']:,} rows of {date} and the champion "
                        f"{rows['champion']:,}: the gate compares both on the same rows (do their specs reject "
                        "or quarantine different rows?)")
    gate = compare(sets["challenger"], sets["champion"], cfg.promote)
    reason = f"on {date} vs champion v{champion.version}: {gate.reason}"
    _write_gate_json(cfg, challenger, {**head, "champion_version": str(champion.version), "rows": rows["challenger"],
                                       **gate.to_dict(), "reason": reason}, evals, str(champion.version))
    tracking.record_decision(cfg, challenger.version, gate.promoted, reason, date.isoformat(), gate.tags())
    return Decision(challenger.version, gate.promoted, reason, champion.version, gate)
