"""`mtrank train`: fit a ranker on the window before a date, evaluate on the date, keep the outcome.

The run directory (`work_dir/runs/<name>/<date>/`) holds everything a later step needs without
retraining: checkpoints (for `--resume`), the fitted statistics, the final weights with the spec
and configs (`model/`), the evaluation report (`report/report.html`) and `metrics.json`. Tracking and registration read from there.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from features.featurize import Featurizer
from features.numeric import NumericStats
from features.spec import FeatureSpec, load_spec
from jobs.config import JobConfig
from jobs.model_io import save_model
from jobs.report import write_report
from pipeline.checkpoint import CheckpointStore, write_atomic
from pipeline.dataset import open_window
from pipeline.evaluate import predict, task_curves, task_metrics
from pipeline.reader import ImpressionReader, fit_numeric_stats
from pipeline.trainer import TrainResult, Trainer, build_model

log = logging.getLogger("mtrank.train")


@dataclass
class TrainOutcome:
    run_dir: Path
    result: TrainResult
    metrics: dict
    summary: dict


def run_dir(cfg: JobConfig, date: dt.date) -> Path:
    return Path(cfg.work_dir) / "runs" / cfg.name / date.isoformat()


def _stats(cfg: JobConfig, spec: FeatureSpec, window, out: Path, progress: bool | None) -> NumericStats:
    """Fitted once per run and kept: a resumed run must standardise exactly as the first attempt."""
    path = out / "numeric_stats.json"
    if path.exists():
        return NumericStats.from_json(path.read_text())
    stats = fit_numeric_stats(ImpressionReader(window, spec, quarantine_dir=cfg.quarantine_dir, progress=progress))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, stats.to_json().encode())
    return stats


def train(cfg: JobConfig, date: dt.date, resume: bool = False, progress: bool | None = None) -> TrainOutcome:
    spec = load_spec(cfg.spec)
    first = date - dt.timedelta(days=cfg.window_days)
    window = open_window(cfg.data, spec, first, date - dt.timedelta(days=1))
    eval_window = open_window(cfg.data, spec, date, date)
    out = run_dir(cfg, date)
    stats = _stats(cfg, spec, window, out, progress)
    featurizer = Featurizer(spec, stats)
    tc = cfg.train
    model = build_model(spec, cfg.model, tc.seed, stats)
    store = CheckpointStore(out / "checkpoints", keep=tc.checkpoint_keep)
    trainer = Trainer(model, spec, tc, store, fingerprint={"window": window.describe(), "stats": stats.to_json()})
    reader = ImpressionReader(window, spec, featurizer, batch_size=tc.batch_size, shuffle=tc.shuffle,
                              shuffle_buffer=tc.shuffle_buffer, seed=tc.seed,
                              quarantine_dir=cfg.quarantine_dir, progress=False)
    t0 = time.perf_counter()
    result = trainer.fit(reader, resume=resume, progress=progress)
    train_s = time.perf_counter() - t0
    ev_reader = ImpressionReader(eval_window, spec, featurizer, batch_size=cfg.eval.batch_size,
                                 quarantine_dir=cfg.quarantine_dir, with_eval=True, progress=False)
    pred = predict(model, ev_reader, cfg.eval.max_rows)  # fp32: bf16 logits would tie rows
    metrics = task_metrics(pred, spec)
    curves = task_curves(pred, spec)
    summary = {"date": date.isoformat(), "train_window": window.describe(), "eval_window": eval_window.describe(),
               "rows": {"read": result.accounting.rows_read, "trained": result.rows_trained,
                        "rejected": result.accounting.rows_rejected,
                        "rejected_by_reason": dict(result.accounting.rejected)},
               "eval_rows": pred.rows, "epochs": result.epochs, "global_step": result.global_step,
               "resumed_from_step": result.resumed_from_step, "train_seconds": train_s}
    save_model(out / "model", model, spec, stats)
    write_report(out / "report", f"{cfg.name}: trained on {window.start}..{window.end}, evaluated on {date}",
                 {"date": date.isoformat(), "train window": window.describe(), "rows": summary["rows"],
                  "evaluation rows": pred.rows, "model": cfg.model.model_dump(mode="json")},
                 metrics, curves, {t: g.tolist() for t, g in pred.gate_means.items()})
    write_atomic(out / "metrics.json", json.dumps({"tasks": metrics, **summary}, indent=1, default=str).encode())
    return TrainOutcome(out, result, metrics, summary)


def format_metrics(metrics: dict) -> str:
    lines = [f"{'task':<10} {'population':<10} {'rows':>9} {'AUC':>7} {'oracle':>7}  other"]
    for name, m in metrics.items():
        if "auc" in m:
            oracle = f"{m['oracle_auc']:.4f}" if "oracle_auc" in m else "-"
            other = f"logloss {m['logloss']:.4f}  pred {m['mean_pred']:.4f} / obs {m['observed_rate']:.4f}"
            lines.append(f"{name:<10} {m['population']:<10} {m['rows']:>9,} {m['auc']:>7.4f} {oracle:>7}  {other}")
        else:
            lines.append(f"{name:<10} {m['population']:<10} {m['rows']:>9,} {'':>7} {'':>7}  "
                         f"RMSE {m['rmse']:.2f}s  R2 {m['r2']:.4f}")
    return "\n".join(lines)
