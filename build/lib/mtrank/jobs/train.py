"""`mtrank train`: fit a ranker on the window before a date, evaluate on the date, keep the outcome.

The run directory (`work_dir/runs/<name>/<date>/`) holds everything a later step needs without
retraining: checkpoints (for `--resume`), the fitted statistics, the final weights with the spec
and configs (`model/`), the evaluation report (`report/report.html`) and `metrics.json`. Tracking and registration read from there.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mtrank.features.compat import compare_specs
from mtrank.features.featurize import Featurizer
from mtrank.features.numeric import NumericStats
from mtrank.features.spec import FeatureSpec, SpecError, load_spec
from mtrank.jobs.config import JobConfig
from mtrank.jobs.model_io import SavedModel, save_model
from mtrank.jobs.paths import quarantine_dir, run_dir
from mtrank.models.warm_start import transfer_weights
from mtrank.jobs.report import gauc_note, strict_json, undefined_figures, write_report
from mtrank.pipeline.checkpoint import CheckpointStore, write_atomic
from mtrank.pipeline.dataset import check_labels, open_window
from mtrank.pipeline.distributed import SINGLE, Dist
from mtrank.pipeline.evaluate import degenerate_outputs, merge_predictions, predict, task_curves, task_metrics
from mtrank.pipeline.reader import ImpressionReader, RowAccounting, fit_numeric_stats, skipped_files
from mtrank.pipeline.trainer import DivergedError, TrainResult, Trainer, build_model

log = logging.getLogger("mtrank.train")


@dataclass
class Parent:
    """The registered version a warm start continues from, and where it sits in its chain."""
    version: str
    saved: SavedModel
    root_version: str      # the full retrain the chain started from
    depth: int             # increments since that full retrain (the parent's own)
    source: str            # alias it was found by
    path: Path | None = None   # where its saved model was downloaded (handed to training ranks)


@dataclass
class TrainOutcome:
    run_dir: Path
    result: TrainResult
    metrics: dict
    summary: dict
    written: bool = True   # False on ranks other than 0: they train and evaluate, rank 0 writes


def _stats(cfg: JobConfig, spec: FeatureSpec, window, out: Path, progress: bool | None,
           parent: Parent | None = None, dist: Dist = SINGLE) -> NumericStats:
    """Fitted once per run and kept: a resumed run must standardise exactly as the first attempt.
    Warm starts follow `warm_start.numeric_stats`: running moments, or the parent's frozen.
    Data-parallel, each rank fits its shard and the moments are merged (rank 0 decides and writes)."""
    path = out / "numeric_stats.json"
    kept = dist.broadcast(path.read_text() if dist.is_main and path.exists() else None)
    if kept is not None:
        return NumericStats.from_json(kept)
    if parent is not None and cfg.warm_start.numeric_stats == "frozen":
        stats = parent.saved.stats
    else:
        mine = fit_numeric_stats(ImpressionReader(window, spec, rank=dist.rank, world_size=dist.world_size,
                                                  quarantine_dir=quarantine_dir(cfg, "train"),
                                                  progress=progress if dist.is_main else False))
        stats = NumericStats()
        for part in dist.all_gather(mine):
            stats = stats.merge(part)
        if parent is not None:
            stats = parent.saved.stats.merge(stats)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, stats.to_json().encode())
    return stats


def check_warm_start(parent: Parent, spec: FeatureSpec, cfg: JobConfig) -> frozenset[str]:
    """Tables to re-initialise; raises SpecError naming what makes the parent unusable."""
    where = f"warm start from {cfg.name} v{parent.version}"
    if parent.saved.config != cfg.model:
        old, new = parent.saved.config.model_dump(), cfg.model.model_dump()
        diff = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
        raise SpecError(f"{where}: the model config changed ({diff}); retrain from scratch "
                        "(mtrank daily --full, or warm_start.from: none)")
    ch = compare_specs(parent.saved.spec, spec)
    if ch.blocking:
        raise SpecError(f"{where}: the FeatureSpec changed in a way no warm start can bridge: "
                        + "; ".join(ch.blocking) + ". Retrain from scratch (mtrank daily --full).")
    if ch.tables and not cfg.warm_start.reinit_changed_tables:
        raise SpecError(f"{where}: embedding tables changed: "
                        + "; ".join(f"table {t!r}: {why}" for t, why in ch.tables.items())
                        + ". Set warm_start.reinit_changed_tables: true to re-initialise them, or retrain "
                          "from scratch (mtrank daily --full).")
    return frozenset(ch.tables)


def train(cfg: JobConfig, date: dt.date, resume: bool = False, progress: bool | None = None,
          parent: Parent | None = None, dist: Dist = SINGLE) -> TrainOutcome:
    """Train for `date`: from scratch on `window_days`, or (with `parent`) continue the parent on the
    `warm_start.days` newest days. With `dist` every rank of a torchrun job calls this: each reads
    its shard, and only rank 0 writes the run directory (the outcome it returns is the whole job's)."""
    spec = load_spec(cfg.spec)
    reinit = check_warm_start(parent, spec, cfg) if parent is not None else frozenset()
    first = date - dt.timedelta(days=cfg.warm_start.days if parent is not None else cfg.window_days)
    window = open_window(cfg.data, spec, first, date - dt.timedelta(days=1), on_unreadable=cfg.on_unreadable_file)
    eval_window = open_window(cfg.data, spec, date, date, on_unreadable=cfg.on_unreadable_file)
    out = run_dir(cfg, date)
    check_labels(window, spec, cfg.train.min_rows)
    stats = _stats(cfg, spec, window, out, progress, parent, dist)
    featurizer = Featurizer(spec, stats)
    tc = cfg.train
    if parent is None:
        model = build_model(spec, cfg.model, tc.seed, stats)
    else:  # the parent's weights (heads included): no base-rate re-initialisation
        model = build_model(spec, cfg.model, tc.seed)
        transfer_weights(parent.saved.model, model, reinit)
    store = CheckpointStore(out / "checkpoints", keep=tc.checkpoint_keep)
    trainer = Trainer(model, spec, tc, store, fingerprint={
        "window": window.describe(), "stats": stats.to_json(), "parent": parent.version if parent else None},
        dist=dist)
    if parent is not None and parent.saved.optimizer is not None and not reinit:
        trainer.load_optimizer_state(parent.saved.optimizer)
    lineage = ({"mode": "full", "parent_version": None, "root_version": None, "depth": 0} if parent is None else
               {"mode": "warm", "parent_version": parent.version, "root_version": parent.root_version,
                "depth": parent.depth + 1, "source": parent.source, "reinitialised_tables": sorted(reinit),
                "optimizer_state": parent.saved.optimizer is not None and not reinit,
                "numeric_stats": cfg.warm_start.numeric_stats})
    reader = ImpressionReader(window, spec, featurizer, batch_size=trainer.rank_batch_size, shuffle=tc.shuffle,
                              shuffle_buffer=tc.shuffle_buffer, seed=tc.seed, rank=dist.rank,
                              world_size=dist.world_size, quarantine_dir=quarantine_dir(cfg, "train"), progress=False)
    t0 = time.perf_counter()
    result = trainer.fit(reader, resume=resume, progress=progress)
    train_s = time.perf_counter() - t0
    optimizer = trainer.optimizer_state()
    del trainer   # the DDP wrapper: released before the process group is left
    # Each rank predicts its shard of the day; rank 0 scores the gathered rows (max_rows split evenly).
    ev_reader = ImpressionReader(eval_window, spec, featurizer, batch_size=cfg.eval.batch_size, rank=dist.rank,
                                 world_size=dist.world_size, quarantine_dir=quarantine_dir(cfg, "train"), with_eval=True,
                                 progress=False)
    max_rows = None if cfg.eval.max_rows is None else -(-cfg.eval.max_rows // dist.world_size)
    parts = dist.gather((predict(model, ev_reader, max_rows), ev_reader.accounting))  # fp32: bf16 ties rows
    if not dist.is_main:
        return TrainOutcome(out, result, {}, {}, written=False)
    pred = merge_predictions([p for p, _ in parts])
    broken = degenerate_outputs(pred)
    if broken and (len(broken) == len(pred.outputs) or any("non-finite" in w for w in broken.values())):
        raise DivergedError(f"the model trained for {date} cannot rank: " + "; ".join(
            f"{k}: {w}" for k, w in broken.items()) + ". Training diverged or learned nothing (lower train.lr / "
            "sparse_lr, check the labels); nothing was saved or registered")
    ev_accounting = RowAccounting.total(acc for _, acc in parts)
    metrics = task_metrics(pred, spec)
    curves = task_curves(pred, spec)
    summary = {"date": date.isoformat(), "train_window": window.describe(), "eval_window": eval_window.describe(),
               "rows": {"read": result.accounting.rows_read, "trained": result.rows_trained,
                        "rejected": result.accounting.rows_rejected,
                        "rejected_by_reason": dict(result.accounting.rejected),
                        **_skipped(window, result.accounting, eval_window, ev_accounting)},
               "eval_rows": pred.rows, "epochs": result.epochs, "global_step": result.global_step,
               "resumed_from_step": result.resumed_from_step, "train_seconds": train_s, "lineage": lineage,
               "ranks": dist.world_size}
    save_model(out / "model", model, spec, stats, optimizer=optimizer)
    write_report(out / "report", f"{cfg.name}: trained on {window.start}..{window.end}, evaluated on {date}",
                 {"date": date.isoformat(), "train window": window.describe(), "rows": summary["rows"],
                  "evaluation rows": pred.rows, "GAUC groups": gauc_note(spec.group_key),
                  "model": cfg.model.model_dump(mode="json")},
                 metrics, curves, {t: g.tolist() for t, g in pred.gate_means.items()})
    undefined = undefined_figures(metrics)
    if undefined:
        log.warning("undefined on %s (one class only, or no rows, in the evaluation population): %s; "
                    "written as null", date, ", ".join(undefined))
    write_atomic(out / "metrics.json", strict_json({"tasks": metrics, **summary}))
    return TrainOutcome(out, result, metrics, summary)


def _skipped(*sources) -> dict:
    """Unreadable files skipped (on_unreadable_file: skip), for the run's row accounting."""
    skipped = skipped_files(*sources)
    return {"files_skipped": len({u["file"] for u in skipped}), "unreadable": skipped}


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

