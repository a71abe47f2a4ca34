"""`mtrank evaluate`: the offline report for any saved model on any day, optionally beside a baseline."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from mtrank.features.featurize import Featurizer
from mtrank.features.inputs import with_served_values
from mtrank.jobs.model_io import SavedModel
from mtrank.jobs.report import gauc_note, served_note, write_report
from mtrank.jobs.tracking import open_model
from mtrank.pipeline.output_files import make_dirs
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import Predictions, predict, task_curves, task_metrics
from mtrank.pipeline.reader import ImpressionReader


AS_SERVED = "AUC as served"


@dataclass
class Evaluation:
    metrics: dict
    curves: dict
    gates: dict[str, list[float]]
    rows: int
    window: dict
    as_served: dict | None = None   # with serve_value features: AUC per binary figure at the served values


def as_served_figures(logged: dict, served: dict, values: dict) -> dict:
    """{"set": the served values, figure: {auc, auc_lo, auc_hi, logged_auc}} for every binary figure."""
    out: dict = {"set": dict(values)}
    for fig, m in served.items():
        if "auc" in m:
            out[fig] = {"auc": m["auc"], "auc_lo": m["auc_lo"], "auc_hi": m["auc_hi"],
                        "logged_auc": logged.get(fig, {}).get("auc")}
    return out


def format_as_served(figures: dict) -> str:
    """One line per binary figure: AUC with the logged values and as served."""
    values = ", ".join(f"{k} = {v!r}" for k, v in figures["set"].items())
    lines = [f"as served ({values} on every row; the logged rows and labels):"]
    for fig, m in figures.items():
        if fig != "set":
            lines.append(f"  {fig:<12} AUC {m['auc']:.4f}  [{m['auc_lo']:.4f}, {m['auc_hi']:.4f}]  "
                         f"(logged values: {m['logged_auc']:.4f})")
    return "\n".join(lines)


class ServedFeaturizer:
    """The model's featurizer with every `serve_value` feature set first: the predictions serving
    makes (every row in the served slot), for the same logged rows and labels."""

    def __init__(self, inner: Featurizer):
        self.inner, self.spec = inner, inner.spec

    def transform(self, data, *args, **kwargs):
        return self.inner.transform(with_served_values(data, self.spec), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def evaluate_model(saved: SavedModel, data: str, date: dt.date, max_rows: int | None = None,
                   batch_size: int = 16_384, quarantine_dir: str | None = None,
                   precision: str = "fp32", on_unreadable: str = "fail",
                   as_served: bool = False) -> tuple[Evaluation, Predictions]:
    """Predict the day with the model's own spec and statistics, then score every task. `as_served`:
    with the features serving sets at their served values (the logged values otherwise)."""
    window = open_window(data, saved.spec, date, date, on_unreadable=on_unreadable)
    featurizer = Featurizer(saved.spec, saved.stats)
    reader = ImpressionReader(window, saved.spec, ServedFeaturizer(featurizer) if as_served else featurizer,
                              batch_size=batch_size, quarantine_dir=quarantine_dir, with_eval=True, progress=False)
    pred = predict(saved.model, reader, max_rows, precision)
    ev = Evaluation(task_metrics(pred, saved.spec), task_curves(pred, saved.spec),
                    {t: g.tolist() for t, g in pred.gate_means.items()}, pred.rows, window.describe())
    return ev, pred


def evaluate(model: str | Path, data: str, date: dt.date, out_dir: str | Path, baseline: str | Path | None = None,
             max_rows: int | None = None, tracking_uri: str | None = None,
             quarantine_dir: str | None = None) -> tuple[Path, Evaluation, Evaluation | None]:
    """`model` / `baseline`: a saved-model directory or an MLflow URI (models:/NAME@champion ...)."""
    make_dirs(out_dir)  # an unwritable report folder fails before any work, naming it
    saved = open_model(model, tracking_uri)
    group_key = saved.spec.group_key
    ev, _ = evaluate_model(saved, data, date, max_rows, quarantine_dir=quarantine_dir)
    base = None
    if baseline:
        base = evaluate_model(open_model(baseline, tracking_uri), data, date, max_rows,
                              quarantine_dir=quarantine_dir)[0]
    meta = {"model": str(model), "baseline": str(baseline) if baseline else None, "date": date.isoformat(),
            "evaluation rows": ev.rows, "window": ev.window, "GAUC groups": gauc_note(group_key),
            **served_note(saved.spec.served_values)}
    if saved.spec.served_values:   # the same rows ranked as serving ranks them: how much AUC the slot carried
        served = evaluate_model(saved, data, date, max_rows, quarantine_dir=quarantine_dir, as_served=True)[0]
        ev.as_served = as_served_figures(ev.metrics, served.metrics, saved.spec.served_values)
        meta[AS_SERVED] = ev.as_served
    html, _ = write_report(out_dir, f"mtrank evaluation, {date}", meta, ev.metrics, ev.curves, ev.gates,
                           base.metrics if base else None, base.curves if base else None)
    return html, ev, base
