"""`mtrank tune-fusion`: search the fusion parameters on a held-out logged day.

The registered model predicts every logged row of day D exactly as `mtrank score` would (its own
FeatureSpec and statistics, chunked, inference mode); request id, price and the action labels ride
along. Requests are split by an xxhash of their id into a tuning half (searched) and a holdout half
(only evaluated); the pure objective and search live in `pipeline/scoring/tuning.py`.
"""
from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.featurize import Featurizer
from features.rules import BadInputError
from jobs.config import JobConfig
from jobs.model_io import SavedModel, load_model
from pipeline.evaluate import FORWARD_ROWS, predict_rows
from pipeline.checkpoint import write_atomic
from pipeline.dataset import open_window
from pipeline.reader import ImpressionReader
from pipeline.scoring import tuning
from pipeline.scoring.fusion import CART, COLLECT, CTR, CVR, STAY
from pipeline.scoring.stage import dense_codes

OUTPUTS = (CTR, CVR, STAY, CART, COLLECT)
# action -> (task whose label it is, label name when the spec has no such task)
ACTIONS = {"click": ("ctr", "click"), "conversion": ("cvr", "conversion"), "cart": ("cart", "cart"),
           "collect": ("collect", "collect")}


@dataclass
class TuneOutcome:
    result: dict
    run_id: str | None = None
    json_path: Path | None = None


def _capped(frames: Iterator[pa.RecordBatch], max_rows: int | None, rid: str) -> Iterator[pa.RecordBatch]:
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
    t = pa.Table.from_batches(held)
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


def predict_day(saved: SavedModel, data: str | Path, day: dt.date, price_column: str,
                max_rows: int | None = None, quarantine_dir: str | Path | None = None,
                item_column: str = "item_id") -> tuple[dict, dict]:
    """(columns, accounting): flat arrays request_id, item, price, click, conversion, cart, collect and
    the model's fusion outputs for every accepted row of day `day` (first `max_rows` when set)."""
    spec = saved.spec
    labels = {a: spec.task_by_name[t].label if t in spec.task_by_name else d for a, (t, d) in ACTIONS.items()}
    extras = list(dict.fromkeys([spec.request_id, item_column, price_column, *labels.values()]))
    window = open_window(data, spec, day, day)
    reader = ImpressionReader(window, spec, quarantine_dir=quarantine_dir, progress=False, extra_columns=extras)
    featurizer = Featurizer(spec, saved.stats)
    outputs: dict[str, list[np.ndarray]] = {}
    sides: list[pa.RecordBatch] = []
    for rb in _capped(reader.frames(), max_rows, spec.request_id):
        for k, v in predict_rows(saved.model, featurizer, rb).items():
            if k in OUTPUTS:
                outputs.setdefault(k, []).append(v)
        sides.append(rb.select(extras))
    acc = reader.accounting
    if not sides:
        raise BadInputError(f"{data}/dt={day}", None, "no_rows", "no logged row passed validation",
                            count=acc.rows_read)
    side = pa.Table.from_batches(sides)
    cols = {k: np.concatenate(v) for k, v in outputs.items()}
    cols["request_id"] = side[spec.request_id].to_numpy(zero_copy_only=False)
    cols["item"] = item_codes(side[item_column])
    cols["price"] = pc.cast(side[price_column], pa.float64()).to_numpy(zero_copy_only=False)
    for action, label in labels.items():
        cols[action] = pc.fill_null(side[label], 0).to_numpy(zero_copy_only=False)
    accounting = {"rows_read": acc.rows_read, "rows_rejected": acc.rows_rejected,
                  "rejected_by_reason": dict(acc.rejected), "rows_used": side.num_rows,
                  "capped": max_rows is not None and side.num_rows < acc.rows_accepted}
    return cols, accounting


def _matrix(cols: dict, rows: np.ndarray, k: int) -> tuning.RequestMatrix:
    return tuning.RequestMatrix.build(cols["request_id"][rows], {o: cols[o][rows] for o in OUTPUTS if o in cols},
                                      cols["price"][rows], cols["click"][rows], cols["conversion"][rows],
                                      cols["cart"][rows], cols["collect"][rows], k, item_ids=cols["item"][rows])


def tune_fusion(cfg: JobConfig, model_ref: str, data: str | Path, day: dt.date, *, k: int = 10,
                trials: int = 200, objective: str = "gmv", max_rows: int | None = None, seed: int = 0,
                json_path: str | Path | None = None, track: bool = True) -> TuneOutcome:
    """Search alpha, beta, a, b, c on the tuning half of day `day`; report start vs best on both halves."""
    from jobs.tracking import log_tuning, model_version_of, resolve_model, tracking_uri

    base = cfg.score.fusion
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtrank-tune-") as tmp:
        saved = load_model(resolve_model(model_ref, Path(tmp), tracking_uri(cfg)))
    version = model_version_of(model_ref, tracking_uri(cfg))
    qdir = Path(cfg.quarantine_dir or Path(cfg.work_dir) / "quarantine") / "tune-fusion"
    cols, accounting = predict_day(saved, data, day, base.price_column, max_rows, qdir,
                                   item_column=cfg.score.item_column)
    t1 = time.perf_counter()

    holdout = tuning.split_requests(cols["request_id"])
    halves = {"tune": _matrix(cols, np.flatnonzero(~holdout), k),
              "holdout": _matrix(cols, np.flatnonzero(holdout), k)}
    found = tuning.search(halves["tune"], base, k=k, trials=trials, objective=objective, seed=seed)
    t2 = time.perf_counter()

    start, best = found.start.params, found.best_trial.params
    report = {name: {half: vars(tuning.evaluate(m, params, base, k)) for half, m in halves.items()}
              for name, params in (("start", start), ("best", best))}
    change = {half: {o: tuning.relative_change(report["start"][half][o], report["best"][half][o])
                     for o in tuning.OBJECTIVES} for half in halves}
    result = {
        "date": str(day), "model_uri": model_ref, "model_version": version, "objective": objective, "k": k,
        "trials": len(found.trials), "trial_budget": trials, "seed": seed, "max_rows": max_rows,
        "rows": accounting,
        "split": {"method": "xxhash64(request_id) & 1: 0 = tune, 1 = holdout (seed fixed in "
                            "pipeline/scoring/tuning.py); the search sees the tune half only",
                  **{half: m.describe() for half, m in halves.items()}},
        "gain": "NDCG gain: 0 no click, 1 click, 2 cart or collect, 3 conversion; requests with no "
                "positive are excluded from the NDCG mean (ndcg_excluded_requests)",
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
        write_atomic(path, json.dumps(result, indent=1, default=_json_default).encode())
    run_id = log_tuning(cfg, str(day), model_ref, result, path) if track else None
    return TuneOutcome(result, run_id, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


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
             f"(split by xxhash64 of request_id)",
             "",
             f"  {'param':<6} {'start':>10} {'best':>10}"]
    for name in tuning.PARAMS:
        fixed = "  (fixed: model has no such output)" if name in r["fixed_params"] else ""
        lines.append(f"  {name:<6} {p0[name]:>10.4g} {p1[name]:>10.4g}{fixed}")
    lines += ["", f"  {'half':<8} {'metric':<8} {'start':>12} {'best':>12} {'change':>9}"]
    for half in ("tune", "holdout"):
        for o, label in (("gmv", f"GMV@{k}"), ("ndcg", f"NDCG@{k}")):
            lines.append(f"  {half:<8} {label:<8} {r['start'][half][o]:>12.4f} {r['best'][half][o]:>12.4f} "
                         f"{_pct(r['change'][half][o]):>9}")
    lines += ["",
              f"NDCG excludes requests with no positive: {sp['tune']['ndcg_excluded_requests']:,} tune, "
              f"{sp['holdout']['ndcg_excluded_requests']:,} holdout. The holdout rows are the claim: the "
              f"search never saw them.",
              f"best = trial {r['best']['trial']} ({r['best']['phase']}); "
              f"{r['seconds']['ms_per_trial']:.1f} ms/trial, {r['seconds']['total_s']:.1f}s in all"]
    return "\n".join(lines)
