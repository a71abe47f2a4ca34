"""`mtrank train`: fit a ranker on the window before a date, evaluate on the date, keep the outcome.

The run directory (`work_dir/runs/<name>/<date>/`) holds everything a later step needs without
retraining: checkpoints (for `--resume`), the fitted statistics, the final weights with the spec
and configs (`model/`), the evaluation report (`report/report.html`) and `metrics.json`. Tracking and registration read from there.
"""
from __future__ import annotations

import datetime as dt
import math
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mtrank.features.compat import compare_specs
from mtrank.features.featurize import Featurizer
from mtrank.features.numeric import NumericStats
from mtrank.features.spec import FeatureSpec, SpecError, load_spec
from mtrank.jobs.config import JobConfig
from mtrank.jobs.live_run import LiveRun
from mtrank.jobs.model_io import SavedModel, save_model
from mtrank.jobs.paths import quarantine_dir, run_dir
from mtrank.models.ranker import check_tables
from mtrank.models.warm_start import transfer_weights
from mtrank.jobs.evaluate import AS_SERVED, ServedFeaturizer, as_served_figures
from mtrank.jobs.report import gauc_note, served_note, strict_json, undefined_figures, write_report
from mtrank.pipeline.checkpoint import CheckpointStore
from mtrank.pipeline.output_files import write_atomic
from mtrank.pipeline.dataset import check_labels, open_window
from mtrank.pipeline.ranks import SINGLE, Dist
from mtrank.pipeline.feature_cache import FeatureCache
from mtrank.pipeline.evaluate import degenerate_outputs, merge_predictions, predict, task_curves, task_metrics
from mtrank.pipeline.reader import ImpressionReader, RowAccounting, fit_numeric_stats, open_parquet, skipped_files
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
                                                  progress=progress if dist.is_main else False,
                                                  negatives=sampled_negatives(cfg, spec),
                                                  workers=cfg.train.data_workers, holdout=split(cfg, spec, False)))
        stats = NumericStats()
        for part in dist.all_gather(mine):
            stats = stats.merge(part)
        if parent is not None:
            stats = parent.saved.stats.merge(stats)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, stats.to_json().encode())
    return stats


def _admission(spec: FeatureSpec, reader: ImpressionReader, model, parent: Parent | None,
               dist: Dist = SINGLE) -> dict | None:
    """Frequency admission of the tables with min_count > 1 (`features.admission`): lookups per id
    over the training window (each rank its shard, summed); ids under min_count share the table's
    rare row. The admitted set is a model buffer, saved with the weights, so evaluation, scoring and
    the pyfunc apply it as training did. A warm start keeps the ids its parent admitted. The count
    reads the training reader's shard once; with the memory feature cache that pass fills the cache,
    so the window is not read twice."""
    import numpy as np

    from mtrank.features.admission import IdCounts, admission_tables, format_summary

    tables = admission_tables(spec)
    if not tables:
        return None
    mine = IdCounts({t: np.zeros(spec.embedding_tables[t].buckets, np.int64) for t in tables})

    def count(arrays) -> None:
        nonlocal mine
        mine = mine.merge(IdCounts.of_arrays(arrays, spec, tables))

    if reader.cache is not None:
        reader.cache.fill(reader, count)
    else:
        for arrays in reader.featurized(None):
            count(arrays)
    counts = IdCounts()
    for part in dist.all_gather(mine):
        counts = counts.merge(part)
    admitted = counts.admitted(spec)
    if parent is not None:
        for t, ok in admitted.items():
            before = parent.saved.model.embeddings.admitted(t)
            if before is not None and before.numel() == ok.size:
                ok |= before.cpu().numpy()
    model.set_admission(admitted)
    summary = counts.summary(spec)
    if dist.is_main:
        log.info("id admission on the training window (ids under min_count share the rare row):\n%s",
                 "\n".join(format_summary(summary)))
    return summary


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


def sampled_negatives(cfg: JobConfig, spec: FeatureSpec) -> tuple[str, float] | None:
    """(label column, keep rate) of `train.negative_sampling`, checked against the spec's tasks."""
    ns = cfg.train.negative_sampling
    if ns is None or ns.keep_rate == 1:
        return None
    t = spec.task_by_name.get(ns.task)
    if t is None or t.type != "binary" or t.space != "all":
        roots = [x.name for x in spec.tasks if x.type == "binary" and x.space == "all"]
        raise SpecError(f"train.negative_sampling.task: {ns.task!r} is not a binary task trained on all rows; "
                        f"those of the spec are: {', '.join(roots) or 'none'}")
    return t.label, ns.keep_rate


def split(cfg: JobConfig, spec: FeatureSpec, validation: bool) -> tuple[str | None, float, bool] | None:
    """The reader's side of `train.validation_fraction` (None without one): the training readers keep
    the requests outside the hashed fraction, the validation readers those inside. A spec without a
    request id (tabular data: one row, one decision) splits rows by a hash of their position."""
    f = cfg.train.validation_fraction
    return (spec.request_id, f, validation) if f else None


def validation_days(cfg: JobConfig, parent: Parent | None) -> int:
    """Days held out at the end of the window; none for a warm start whose window is not longer."""
    days = cfg.warm_start.days if parent is not None else cfg.window_days
    if cfg.train.validation_days and cfg.train.validation_days >= days:
        log.warning("train.validation_days %d leaves no training day in a %d-day window: no validation",
                    cfg.train.validation_days, days)
        return 0
    return cfg.train.validation_days


def train(cfg: JobConfig, date: dt.date, resume: bool = False, progress: bool | None = None,
          parent: Parent | None = None, dist: Dist = SINGLE, track: bool = False,
          command: str = "train") -> TrainOutcome:
    """Train for `date`: from scratch on `window_days`, or (with `parent`) continue the parent on the
    `warm_start.days` newest days. With `dist` every rank of a torchrun job calls this: each reads
    its shard, and only rank 0 writes the run directory (the outcome it returns is the whole job's).
    `track`: rank 0 keeps an MLflow run open while training (`jobs.live_run`)."""
    spec = load_spec(cfg.spec)
    check_tables(spec, cfg.model)
    reinit = check_warm_start(parent, spec, cfg) if parent is not None else frozenset()
    first = date - dt.timedelta(days=cfg.warm_start.days if parent is not None else cfg.window_days)
    held = validation_days(cfg, parent)
    last = date - dt.timedelta(days=1 + held)
    window = open_window(cfg.data, spec, first, last, on_unreadable=cfg.on_unreadable_file)
    val_window = open_window(cfg.data, spec, last + dt.timedelta(days=1), date - dt.timedelta(days=1),
                             on_unreadable=cfg.on_unreadable_file) if held else None
    if split(cfg, spec, True) is not None:     # hashed requests of the training days themselves
        held, val_window = 1, open_window(cfg.data, spec, first, last, on_unreadable=cfg.on_unreadable_file)
    eval_window = open_window(cfg.data, spec, date, date, on_unreadable=cfg.on_unreadable_file)
    out = run_dir(cfg, date)
    live = LiveRun.start(cfg, date, out, command, [(window, "training")] + ([(val_window, "validation")] if held else [])
                         + [(eval_window, "evaluation")]) if track and dist.is_main else LiveRun()
    try:
        return _train(cfg, date, spec, reinit, window, val_window, eval_window, out, resume, progress, parent, dist,
                      live)
    except BaseException as e:
        live.end(e)
        raise
    finally:
        live.stop_monitor()


def _train(cfg: JobConfig, date: dt.date, spec: FeatureSpec, reinit, window, val_window, eval_window, out: Path,
           resume: bool, progress: bool | None, parent: Parent | None, dist: Dist, live: LiveRun) -> TrainOutcome:
    check_labels(window, spec, cfg.train.min_rows)
    stats = _stats(cfg, spec, window, out, progress, parent, dist)
    featurizer = Featurizer(spec, stats)
    tc = cfg.train
    if parent is None:
        model = build_model(spec, cfg.model, tc.seed, stats)
    else:  # the parent's weights (heads included): no base-rate re-initialisation
        model = build_model(spec, cfg.model, tc.seed)
        transfer_weights(parent.saved.model, model, reinit)
    # the training reader (its feature cache) exists before the trainer: admission's count fills the cache
    cache = FeatureCache(tc.feature_cache, tc.feature_cache_mb << 20,
                         Path(cfg.work_dir) / "feature-cache" / f"{cfg.name}-rank{dist.rank}")
    reader = ImpressionReader(window, spec, featurizer, batch_size=tc.batch_size // dist.world_size,
                              shuffle=tc.shuffle, shuffle_buffer=tc.shuffle_buffer, seed=tc.seed, rank=dist.rank,
                              world_size=dist.world_size, quarantine_dir=quarantine_dir(cfg, "train"), progress=False,
                              negatives=sampled_negatives(cfg, spec), workers=tc.data_workers,
                              holdout=split(cfg, spec, False), cache=cache)
    admission = _admission(spec, reader, model, parent, dist)
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
    validation_loss = trainer.validation_loss
    val_cache = FeatureCache("off" if tc.feature_cache == "off" else "memory", tc.feature_cache_mb << 20)

    def validate() -> dict:
        """The validation days' loss (the trainer's own terms) and AUC per figure."""
        def held_out():
            return ImpressionReader(val_window, spec, featurizer, batch_size=cfg.eval.batch_size,
                                    quarantine_dir=quarantine_dir(cfg, "validation"), progress=False,
                                    cache=val_cache, holdout=split(cfg, spec, True))
        pred = predict(model, held_out(), cfg.eval.max_rows)
        figures = task_metrics(pred, spec)
        return {"loss": validation_loss(held_out()), "rows": pred.rows,
                "auc": {f: m["auc"] for f, m in figures.items() if "auc" in m}}

    t0 = time.perf_counter()
    result = trainer.fit(reader, resume=resume, progress=progress,
                         events=live,
                         validate=validate if val_window is not None else None)
    train_s = time.perf_counter() - t0
    optimizer, precision = trainer.optimizer_state(), trainer.precision
    del trainer   # the DDP wrapper: released before the process group is left
    calibration = _calibrate(cfg, spec, featurizer, model, val_window, dist)
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
    as_served = _as_served(model, spec, featurizer, eval_window, cfg, metrics) if spec.served_values else None
    if calibration:
        _uncalibrated_figures(metrics, curves, model, spec, featurizer, eval_window, cfg)
    summary = {"date": date.isoformat(), "train_window": window.describe(), "eval_window": eval_window.describe(),
               "rows": {"read": result.accounting.rows_read, "trained": result.rows_trained,
                        "rejected": result.accounting.rows_rejected,
                        "sampled_out": result.accounting.sampled_out,
                        "held_out": result.accounting.held_out,
                        "rejected_by_reason": dict(result.accounting.rejected),
                        **_skipped(window, result.accounting, eval_window, ev_accounting)},
               "eval_rows": pred.rows, "epochs": result.epochs, "global_step": result.global_step,
               "resumed_from_step": result.resumed_from_step, "train_seconds": train_s, "lineage": lineage,
               **({"best_epoch": result.best_epoch, "stopped_early": result.stopped_early}
                  if result.best_epoch is not None else {}),
               "ranks": dist.world_size, "precision": precision, "history": _history(live, result),
               **({"validation_window": val_window.describe()} if val_window is not None else {}),
               **({"id_admission": admission} if admission else {}),
               **({"calibration": calibration} if calibration else {})}
    ns = cfg.train.negative_sampling
    save_model(out / "model", model, spec, stats, optimizer=optimizer, input_schema=window.schema,
               input_example=input_example(window, spec),
               training={"negative_sampling": ns.model_dump() if ns is not None and ns.keep_rate < 1 else None,
                         "calibration": calibration})
    write_report(out / "report", f"{cfg.name}: trained on {window.start}..{window.end}, evaluated on {date}",
                 {"date": date.isoformat(), "train window": window.describe(), "rows": summary["rows"],
                  "evaluation rows": pred.rows, "GAUC groups": gauc_note(spec.group_key),
                  **served_note(spec.served_values), **({AS_SERVED: as_served} if as_served else {}),
                  "model": cfg.model.model_dump(mode="json")},
                 metrics, curves, {t: g.tolist() for t, g in pred.gate_means.items()}, history=summary.get("history"))
    undefined = undefined_figures(metrics)
    if undefined:
        log.warning("undefined on %s (one class only, or no rows, in the evaluation population): %s; "
                    "written as null", date, ", ".join(undefined))
    write_atomic(out / "metrics.json", strict_json({"tasks": metrics, **summary}))
    return TrainOutcome(out, result, metrics, summary)


def _history(live: LiveRun, result: TrainResult) -> dict:
    """The report's curves (`LiveRun.history`), and with `train.validate_every_steps` the points
    inside the epochs as `validation_steps`, in the form of the epoch ends' entries plus samples."""
    history = live.history(result.epochs)
    if result.validation_steps:
        history["validation_steps"] = [{"epoch": p["epoch"], "step": p["step"], "samples": p["samples"],
                                        **(p["validation"] or {})} for p in result.validation_steps]
    return history


def _calibrate(cfg: JobConfig, spec: FeatureSpec, featurizer, model, val_window, dist: Dist) -> dict | None:
    """Platt parameters fitted by rank 0 on the validation days and set on every rank's model."""
    from mtrank.pipeline.calibration import fit_calibration

    ns = cfg.train.negative_sampling
    if cfg.train.calibration == "none" or val_window is None:
        if ns is None or ns.keep_rate == 1:
            return None
        # Negatives kept at rate r multiply the odds by 1/r: the true logit is the trained one + log r.
        shift = {ns.task: {"scale": 1.0, "shift": math.log(ns.keep_rate), "fitted": True,
                           "from": f"negative_sampling keep_rate {ns.keep_rate}"}}
        model.set_calibration({ns.task: (1.0, shift[ns.task]["shift"])})
        log.info("%s recalibrated for negative sampling: logit %+.4f (keep rate %g)", ns.task,
                 shift[ns.task]["shift"], ns.keep_rate)
        return shift
    fitted = None
    if dist.is_main:
        reader = ImpressionReader(val_window, spec, featurizer, batch_size=cfg.eval.batch_size,
                                  quarantine_dir=quarantine_dir(cfg, "validation"), progress=False,
                                  holdout=split(cfg, spec, True))
        model.set_calibration({})
        held = predict(model, reader, cfg.eval.max_rows)
        prior_shifts = {ns.task: math.log(ns.keep_rate)} if ns is not None and ns.keep_rate < 1 else {}
        fitted = fit_calibration(held.outputs, held.labels, held.masks, spec, cfg.train.calibration_prior_sd,
                                 prior_shifts)
        log.info("calibration (Platt, on %s validation rows): %s", f"{held.rows:,}", ", ".join(
            f"{t} a={c['scale']:.3f} b={c['shift']:+.3f}" if c["fitted"] else f"{t} not fitted ({c['positives']} "
            "positives)" for t, c in fitted.items()))
    fitted = dist.broadcast(fitted)
    model.set_calibration({t: (c["scale"], c["shift"]) for t, c in fitted.items()
                           if c["fitted"] or c["shift"] != 0.0})
    return fitted


def _as_served(model, spec: FeatureSpec, featurizer, eval_window, cfg: JobConfig, logged: dict) -> dict:
    """The evaluation day's binary figures with every serve_value feature at its served value (rank 0,
    the whole day): what the served scores achieve on the logged rows, beside the logged-value figures."""
    reader = ImpressionReader(eval_window, spec, ServedFeaturizer(featurizer), batch_size=cfg.eval.batch_size,
                              quarantine_dir=quarantine_dir(cfg, "train"), with_eval=True, progress=False)
    return as_served_figures(logged, task_metrics(predict(model, reader, cfg.eval.max_rows), spec),
                             spec.served_values)


def _uncalibrated_figures(metrics: dict, curves: dict, model, spec: FeatureSpec, featurizer, eval_window,
                          cfg: JobConfig) -> None:
    """PCOC, logloss and the reliability curve the uncalibrated model had on the evaluation day,
    beside the calibrated ones (the report draws both)."""
    saved = model.calibration_params()
    model.set_calibration({})
    try:
        pred = predict(model, ImpressionReader(eval_window, spec, featurizer, batch_size=cfg.eval.batch_size,
                                               progress=False), cfg.eval.max_rows)
        raw, raw_curves = task_metrics(pred, spec), task_curves(pred, spec)
    finally:
        model.set_calibration(saved)
    for fig, c in curves.items():
        if fig in raw_curves and c.get("calibration") != raw_curves[fig].get("calibration"):
            c["calibration_uncalibrated"] = raw_curves[fig]["calibration"]
    for fig, m in metrics.items():
        for k in ("pcoc", "logloss"):
            if k in m and k in raw.get(fig, {}):
                m[f"{k}_uncalibrated"] = raw[fig][k]


def input_example(window, spec: FeatureSpec, rows: int = 3):
    """The model's input example: the first rows of the window (feature columns, training types)
    and one row with every feature null that may be (null ids map to row 0, numerics take their
    fill; a numeric without a fill keeps the first row's value)."""
    import pyarrow as pa

    from mtrank.features.inputs import conform, serving_schema
    from mtrank.features.spec import NumericFeature

    if not window.row_groups:
        return None
    schema = serving_schema(spec, window.schema)
    group = window.row_groups[0]
    head = conform(open_parquet(group.file, spec).read_row_group(group.index, columns=schema.names).slice(0, rows),
                   schema, group.file)
    required = {f.name for f in spec.features if isinstance(f, NumericFeature) and f.fill is None}
    nulls = pa.table({f.name: head.column(f.name).slice(0, 1) if f.name in required else pa.nulls(1, f.type)
                      for f in schema})
    return pa.concat_tables([head, nulls])


def _skipped(*sources) -> dict:
    """Unreadable files skipped (on_unreadable_file: skip), for the run's row accounting."""
    skipped = skipped_files(*sources)
    return {"files_skipped": len({u["file"] for u in skipped}), "unreadable": skipped}


def format_metrics(metrics: dict) -> str:
    def num(v, fmt: str) -> str:
        return "-" if v is None or v != v else fmt.format(v)

    w = max([4, *map(len, metrics)])   # a task named anything keeps the columns aligned
    wp = max([10, *(len(str(m["population"])) for m in metrics.values())])
    lines = [f"{'task':<{w}} {'population':<{wp}} {'rows':>9} {'AUC':>7} {'95% CI':>17} {'oracle':>7}  other"]
    for name, m in metrics.items():
        head = f"{name:<{w}} {m['population']:<{wp}} {m['rows']:>9,}"
        if "auc" in m:
            ci = f"[{num(m.get('auc_lo'), '{:.4f}')}, {num(m.get('auc_hi'), '{:.4f}')}]" if "auc_lo" in m else "-"
            other = (f"logloss {num(m['logloss'], '{:.4f}')}  pred {num(m['mean_pred'], '{:.4f}')} / "
                     f"obs {num(m['observed_rate'], '{:.4f}')}  PCOC {num(m.get('pcoc'), '{:.3f}')}"
                     + (f" [{num(m['pcoc_lo'], '{:.2f}')}, {num(m['pcoc_hi'], '{:.2f}')}]" if "pcoc_lo" in m else ""))
            lines.append(f"{head} {num(m['auc'], '{:>7.4f}'):>7} {ci:>17} {num(m.get('oracle_auc'), '{:.4f}'):>7}  {other}")
        else:
            lines.append(f"{head} {'':>7} {'':>17} {'':>7}  RMSE {num(m['rmse'], '{:.2f}')}  R2 {num(m['r2'], '{:.4f}')}")
    return "\n".join(lines)

