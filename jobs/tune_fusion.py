"""`mtrank tune-fusion`: search the fusion factors' offsets and exponents on a held-out logged day.

The registered model predicts every logged row of day D exactly as `mtrank score` would (its own
FeatureSpec and statistics, chunked, inference mode); the request id, the factors' columns, the
value column and the task labels ride along. Requests are split by an xxhash of their id into a tuning half (searched) and a holdout half
(only evaluated); the pure objective and search live in `pipeline/scoring/tuning.py`.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrank.features.featurize import Featurizer
from mtrank.features.rules import BadInputError
from mtrank.features.spec import SpecError
from mtrank.jobs.config import JobConfig
from mtrank.jobs.paths import quarantine_dir
from mtrank.jobs.report import strict_json
from mtrank.jobs.model_io import trained_keep_rate
from mtrank.jobs.tracking import job_run, log_tuning, model_version_of, open_model, tracking_uri
from mtrank.jobs.model_io import SavedModel
from mtrank.pipeline.evaluate import FORWARD_ROWS, predict_rows
from mtrank.pipeline.output_files import write_atomic
from mtrank.pipeline.dataset import list_partitions, missing_day, open_window
from mtrank.pipeline.reader import ImpressionReader, stack_batches
from mtrank.pipeline.scoring import tuning
from mtrank.pipeline.scoring.fusion import FusionPlan, resolve
from mtrank.pipeline.scoring.stage import dense_codes


@dataclass
class TuneOutcome:
    result: dict
    run_id: str | None = None
    json_path: Path | None = None


def _capped(frames: Iterator[pa.RecordBatch], max_rows: int | None, rid: str,
            source: str) -> Iterator[pa.RecordBatch]:
    """The first `max_rows` rows, less the request the cut would split (unless that leaves none)."""
    if max_rows is None:
        yield from frames
        return
    held, n = [], 0
    for rb in frames:
        held.append(rb)
        n += rb.num_rows
        if n > max_rows:
            break
    if not held:
        return
    t = stack_batches(held, source)
    if t.num_rows > max_rows:
        cut = t[rid][max_rows - 1]
        split = cut == t[rid][max_rows]
        t = t.slice(0, max_rows)
        if split:
            whole = t.filter(pc.fill_null(pc.not_equal(t[rid], cut), True))
            t = whole if whole.num_rows else t
    yield from t.to_batches(max_chunksize=FORWARD_ROWS)


def item_codes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Codes numbered like the item ids (the scorer's tie-break order), a missing id after them all."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    valid = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    codes = np.zeros(len(ids), np.int64)
    if valid.any():
        codes[valid] = dense_codes(ids.filter(pa.array(valid)))[0]
        codes[~valid] = codes[valid].max() + 1
    return codes


def predict_day(saved: SavedModel, data: str | Path, day: dt.date, plan: FusionPlan, value_column: str | None,
                max_rows: int | None = None, quarantine_dir: str | Path | None = None,
                item_column: str = "item_id") -> tuple[dict, dict]:
    """(columns, accounting) for every accepted row of day `day` (first `max_rows` when set): flat
    arrays `request_id`, `item`, `outputs` (the formula's), `columns` (the factors' candidate columns),
    `labels` (task -> label) and `value` (the value column, if any)."""
    spec = saved.spec
    spec.request_column("tune-fusion")
    binary = [t for t in spec.tasks if t.type == "binary"]
    extras = list(dict.fromkeys([spec.request_id, item_column, *plan.columns,
                                 *([value_column] if value_column else []), *(t.label for t in binary)]))
    window = open_window(data, spec, day, day)
    parts = list_partitions(data)
    where = str(parts.get(day) or missing_day(data, parts, day))   # the day's folder, in the logs' own layout
    reader = ImpressionReader(window, spec, quarantine_dir=quarantine_dir, progress=False, extra_columns=extras,
                              not_null=(spec.request_id,))
    featurizer = Featurizer(spec, saved.stats)
    need = set(plan.required_outputs(searching=True))
    outputs: dict[str, list[np.ndarray]] = {}
    sides: list[pa.RecordBatch] = []
    for rb in _capped(reader.frames(), max_rows, spec.request_id, where):
        for k, v in predict_rows(saved.model, featurizer, rb).items():
            if k in need:
                outputs.setdefault(k, []).append(v)
        sides.append(rb.select(extras))
    acc = reader.accounting
    if not sides:
        raise BadInputError(where, None, "no_rows", "no logged row passed validation",
                            count=acc.rows_read)
    side = stack_batches(sides, where)
    floats = lambda c: pc.cast(side[c], pa.float64()).to_numpy(zero_copy_only=False)  # noqa: E731
    cols = {"outputs": {k: np.concatenate(v) for k, v in outputs.items()},
            "columns": {c: floats(c) for c in plan.columns},
            "labels": {t.name: pc.fill_null(side[t.label], 0).to_numpy(zero_copy_only=False) for t in binary},
            "request_id": side[spec.request_id].to_numpy(zero_copy_only=False),
            "item": item_codes(side[item_column]),
            "value": floats(value_column) if value_column else None}
    accounting = {"rows_read": acc.rows_read, "rows_rejected": acc.rows_rejected,
                  "rejected_by_reason": dict(acc.rejected), "rows_used": side.num_rows,
                  "capped": max_rows is not None and side.num_rows < acc.rows_accepted}
    return cols, accounting


def _matrix(cols: dict, rows: np.ndarray, k: int, gains: dict[str, float], value_task: str | None) -> tuning.RequestMatrix:
    labels = {t: v[rows] for t, v in cols["labels"].items()}
    value = (cols["value"][rows] * (labels[value_task] > 0) if value_task else np.zeros(len(rows)))
    return tuning.RequestMatrix.build(cols["request_id"][rows], {o: v[rows] for o, v in cols["outputs"].items()},
                                      {c: v[rows] for c, v in cols["columns"].items()}, value,
                                      tuning.graded_gain(labels, gains), k, item_ids=cols["item"][rows])


def tune_fusion(cfg: JobConfig, model_ref: str, data: str | Path, day: dt.date, *, k: int = 10,
                trials: int = 200, objective: str | None = None, max_rows: int | None = None, seed: int = 0,
                json_path: str | Path | None = None, track: bool = True) -> TuneOutcome:
    """Search the fusion factors' free parameters on the tuning half of day `day`; report start vs
    best on both halves. `objective`: value | ndcg (default: value when score.tune names a value
    column, else ndcg)."""
    tc = cfg.score.tune
    has_value = tc.value_column is not None
    objective = objective or ("value" if has_value else "ndcg")
    t0 = time.perf_counter()
    saved = open_model(model_ref, tracking_uri(cfg))
    version = model_version_of(model_ref, tracking_uri(cfg))
    plan = resolve(cfg.score.fusion, saved.spec.outputs, trained_keep_rate(saved))
    gains = tuning.check_tune(tc, saved.spec.outputs)
    if not plan.bounds():
        raise SpecError("score.fusion.factors: no factor has a `search` range (offset or exponent), so "
                        "tune-fusion has nothing to search")
    if objective == "value" and not has_value:
        raise SpecError("objective value needs score.tune.value_column and score.tune.value_task")
    qdir = quarantine_dir(cfg, "tune-fusion")
    with job_run(cfg, "tune-fusion", str(day), model_ref, "tuned", track) as run_id:   # refused: before the day is read
        cols, accounting = predict_day(saved, data, day, plan, tc.value_column, max_rows, qdir,
                                       item_column=cfg.score.item_column)
        return _search(cfg, model_ref, day, saved, plan, cols, accounting, t0, version, k=k, gains=gains,
                       objective=objective, trials=trials, seed=seed, max_rows=max_rows, has_value=has_value,
                       json_path=json_path, track=track, run_id=run_id)


def _search(cfg: JobConfig, model_ref: str, day: dt.date, saved: SavedModel, plan: FusionPlan, cols: dict,
            accounting: dict, t0: float, version: str | None, *, k: int, gains: dict[str, float], objective: str,
            trials: int, seed: int, max_rows: int | None, has_value: bool, json_path: str | Path | None,
            track: bool, run_id: str | None) -> TuneOutcome:
    """The search on the tune half, both halves evaluated at the start and best parameters, logged."""
    tc = cfg.score.tune
    t1 = time.perf_counter()

    holdout = tuning.split_requests(cols["request_id"])
    halves = {"tune": _matrix(cols, np.flatnonzero(~holdout), k, gains, tc.value_task),
              "holdout": _matrix(cols, np.flatnonzero(holdout), k, gains, tc.value_task)}
    found = tuning.search(halves["tune"], plan, k=k, trials=trials, objective=objective, seed=seed,
                          has_value=has_value)
    t2 = time.perf_counter()

    start, best = found.start.params, found.best_trial.params
    report = {name: {half: vars(tuning.evaluate(m, params, plan, k, has_value)) for half, m in halves.items()}
              for name, params in (("start", start), ("best", best))}
    change = {half: {o: tuning.relative_change(report["start"][half][o], report["best"][half][o])
                     for o in tuning.OBJECTIVES} for half in halves}
    result = {
        "date": str(day), "model_uri": model_ref, "model_version": version, "objective": objective, "k": k,
        "trials": len(found.trials), "trial_budget": trials, "seed": seed, "max_rows": max_rows,
        "rows": accounting,
        "formula": {"start": plan.formula(), "best": plan.with_params(best).formula()},
        "split": {"method": "xxhash64(request_id) & 1: 0 = tune, 1 = holdout (seed fixed in "
                            "pipeline/scoring/tuning.py); the search sees the tune half only",
                  **{half: m.describe() for half, m in halves.items()}},
        "gain": f"NDCG gain per row: the highest of {gains} among the tasks it is positive on, else 0; "
                "requests with no positive are excluded from the NDCG mean (ndcg_excluded_requests)",
        "value": (f"value@K: sum over the top K of {tc.value_column} where {tc.value_task} is positive"
                  if has_value else "not configured (score.tune.value_column / value_task)"),
        "value_configured": has_value,
        "search_bounds": {p: list(b) for p, b in plan.bounds().items()},
        "start": {"params": start, **report["start"]},
        "best": {"params": best, "trial": found.best, "phase": found.best_trial.phase, **report["best"]},
        "change": change,
        "fixed_params": found.fixed,
        "seconds": {"load_predict_s": t1 - t0, "search_s": t2 - t1,
                    "ms_per_trial": 1e3 * found.seconds / len(found.trials), "total_s": time.perf_counter() - t0},
        "trial_log": [vars(t) for t in found.trials],
    }
    path = None
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, strict_json(result))
    run_id = log_tuning(cfg, str(day), model_ref, result, path, run_id) if track else None
    return TuneOutcome(result, run_id, path)


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:+.2%}"


def format_result(r: dict) -> str:
    """The start-vs-best table the CLI prints."""
    k, sp = r["k"], r["split"]
    p0, p1 = r["start"]["params"], r["best"]["params"]
    lines = [f"tune-fusion {r['date']}  model {r['model_uri']}"
             + (f" (v{r['model_version']})" if r["model_version"] else "")
             + f"  objective {r['objective']}@{k}, {r['trials']} trials (seed {r['seed']})",
             f"rows used {r['rows']['rows_used']:,} (read {r['rows']['rows_read']:,}, rejected "
             f"{r['rows']['rows_rejected']:,}{', capped by --max-rows' if r['rows']['capped'] else ''}); "
             f"requests tune {sp['tune']['requests']:,} / holdout {sp['holdout']['requests']:,} "
             f"(split by xxhash64 of the request id)",
             f"start: score = {r['formula']['start']}",
             f"best:  score = {r['formula']['best']}",
             "",
             f"  {'parameter':<24} {'start':>10} {'best':>10}"]
    for name in r["search_bounds"]:
        lines.append(f"  {name:<24} {p0[name]:>10.4g} {p1[name]:>10.4g}")
    lines += ["", f"  {'half':<8} {'metric':<9} {'start':>12} {'best':>12} {'change':>9}"]
    # without a value column value@K is undefined: its rows would read nan
    metrics = (("value", f"value@{k}"), ("ndcg", f"NDCG@{k}")) if r["value_configured"] else (("ndcg", f"NDCG@{k}"),)
    for half in ("tune", "holdout"):
        for o, label in metrics:
            lines.append(f"  {half:<8} {label:<9} {r['start'][half][o]:>12.4f} {r['best'][half][o]:>12.4f} "
                         f"{_pct(r['change'][half][o]):>9}")
    lines += ["",
              *([] if r["value_configured"] else [f"value@{k}: {r['value']}"]),
              f"NDCG excludes requests with no positive: {sp['tune']['ndcg_excluded_requests']:,} tune, "
              f"{sp['holdout']['ndcg_excluded_requests']:,} holdout. The holdout rows are the claim: the "
              f"search never saw them.",
              f"best = trial {r['best']['trial']} ({r['best']['phase']}); "
              f"{r['seconds']['ms_per_trial']:.1f} ms/trial, {r['seconds']['total_s']:.1f}s in all"]
    return "\n".join(lines)
