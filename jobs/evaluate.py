"""`mtrank evaluate`: the offline report for any saved model on any day, optionally beside a baseline."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from mtrank.features.featurize import Featurizer
from mtrank.jobs.model_io import SavedModel
from mtrank.jobs.report import gauc_note, served_note, write_report
from mtrank.jobs.tracking import open_model
from mtrank.pipeline.output_files import make_dirs
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import Predictions, predict, task_curves, task_metrics
from mtrank.pipeline.reader import ImpressionReader


@dataclass
class Evaluation:
    metrics: dict
    curves: dict
    gates: dict[str, list[float]]
    rows: int
    window: dict


def evaluate_model(saved: SavedModel, data: str, date: dt.date, max_rows: int | None = None,
                   batch_size: int = 16_384, quarantine_dir: str | None = None,
                   precision: str = "fp32", on_unreadable: str = "fail") -> tuple[Evaluation, Predictions]:
    """Predict the day with the model's own spec and statistics, then score every task."""
    window = open_window(data, saved.spec, date, date, on_unreadable=on_unreadable)
    reader = ImpressionReader(window, saved.spec, Featurizer(saved.spec, saved.stats), batch_size=batch_size,
                              quarantine_dir=quarantine_dir, with_eval=True, progress=False)
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
    html, _ = write_report(out_dir, f"mtrank evaluation, {date}", meta, ev.metrics, ev.curves, ev.gates,
                           base.metrics if base else None, base.curves if base else None)
    return html, ev, base
