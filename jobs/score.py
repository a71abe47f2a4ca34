"""`mtrank score`: candidates + a registered model -> fused scores -> rules -> ranked lists Parquet.

The model is loaded from the registry (its own FeatureSpec and hash seed, so scoring hashes exactly
like training), candidates are validated and streamed through it, and the pure scoring stage
(pipeline/scoring) fuses and applies the rules. The output is written under a temporary name and
renamed, so a failed or interrupted job never leaves a half-written file under the final name.
Candidates, exposures and the output may be object-store URIs (s3://...; features/storage.py): there
the output and its summary are each one complete upload under the final key (atomic by itself).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrank.features import storage
from mtrank.features.featurize import Featurizer
from mtrank.features.rules import MISSING_COLUMN, BadInputError
from mtrank.features.base import failpoint
from mtrank.jobs.config import JobConfig
from mtrank.jobs.paths import quarantine_dir
from mtrank.jobs.report import strict_json
from mtrank.jobs.model_io import trained_keep_rate
from mtrank.jobs.tracking import job_run, log_scoring, model_version_of, open_model, tracking_uri
from mtrank.pipeline.evaluate import overlap_pays, predict_frames, predict_rows
from mtrank.pipeline.candidates import CandidateReader, candidate_files
from mtrank.pipeline.reader import stack_batches
from mtrank.pipeline.output_files import check_output, write_output
from mtrank.pipeline.progress import Progress
from mtrank.pipeline.scoring import ScoringConfig, score_candidates
from mtrank.pipeline.scoring.fusion import resolve

log = logging.getLogger("mtrank.score")


@dataclass
class ScoreOutcome:
    out: Path | str   # a URI for an object-store output
    summary: dict
    table: pa.Table
    run_id: str | None = None
    request_column: str = "request_id"
    factor_terms: dict[str, str] = field(default_factory=dict)   # factor column -> its term of the formula


def _side_table(path: str | None, columns: dict[str, str], what: str) -> pa.Table | None:
    if path is None:
        return None
    try:
        table = storage.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise BadInputError(path, None, "unreadable_file", f"cannot read the {what} ({e})") from None
    for col, meaning in columns.items():
        if col not in table.column_names:
            raise BadInputError(path, col, MISSING_COLUMN, f"the {what} needs column {col!r} ({meaning})")
    return table


def _counts(table: pa.Table, path: str, column: str, item_column: str) -> pa.Table:
    """A side table's count column (exposures, caps): integers >= 0 and item ids present, or a
    clear error naming the file, column and rule; an item listed twice is summed (and said)."""
    if not pa.types.is_integer(table.schema.field(column).type):
        raise BadInputError(path, column, "wrong_type", f"must hold integers, found {table.schema.field(column).type}")
    for col, rule in ((item_column, "null item id"), (column, "null count")):
        nulls = table[col].null_count
        if nulls:
            raise BadInputError(path, col, "null", f"rows have a {rule}", count=nulls)
    negative = int(pc.sum(pc.less(table[column], 0)).as_py() or 0)
    if negative:
        raise BadInputError(path, column, "negative", "rows are negative (a count is >= 0)", count=negative)
    t = table.group_by(item_column).aggregate([(column, "sum")]).rename_columns([item_column, column]) \
        if pc.count_distinct(table[item_column]).as_py() < table.num_rows else table
    if t.num_rows < table.num_rows:
        log.warning("%s: %d rows repeat an item; their %s are summed", path, table.num_rows - t.num_rows, column)
    return t


def _on_day(table: pa.Table, column: str, day: dt.date) -> pa.Array:
    """Rows whose date column (date, timestamp or 'YYYY-MM-DD') is `day`."""
    return pc.equal(pc.cast(table[column], pa.date32()), pa.scalar(day, pa.date32()))


def read_exposures(path: str | None, item_column: str, day: dt.date) -> pa.Table | None:
    """Exposures already served on `day` (rows of other days in the file do not count)."""
    t = _side_table(path, {item_column: "item id", "dt": "day", "exposures": "exposure count"}, "exposures table")
    if t is None:
        return None
    return _counts(t.filter(_on_day(t, "dt", day)).select([item_column, "exposures"]), path, "exposures", item_column)


def read_caps(path: str | None, item_column: str) -> pa.Table | None:
    t = _side_table(path, {item_column: "item id", "cap": "daily exposure cap"}, "caps table")
    if t is None:
        return None
    t = t.select([item_column, "cap"])
    if pc.count_distinct(t[item_column]).as_py() < t.num_rows:
        raise BadInputError(path, item_column, "duplicate", "an item has more than one cap")
    return _counts(t, path, "cap", item_column)


def read_campaign(path: str | None, item_column: str, day: dt.date) -> pa.Array | None:
    """Items whose campaign runs on `day` (start_dt <= day <= end_dt)."""
    t = _side_table(path, {item_column: "item id", "start_dt": "first day", "end_dt": "last day"}, "campaign list")
    if t is None:
        return None
    d = pa.scalar(day, pa.date32())
    active = pc.and_(pc.less_equal(pc.cast(t["start_dt"], pa.date32()), d),
                     pc.greater_equal(pc.cast(t["end_dt"], pa.date32()), d))
    return t[item_column].filter(active).combine_chunks()


def _write_parquet(table: pa.Table, out: Path | str) -> None:
    check_output(out)
    # dictionary pages for the key and label columns only: a float score column has almost no
    # repeated values, so trying a dictionary first is wasted work (a quarter of the write time)
    dict_columns = [f.name for f in table.schema if not pa.types.is_floating(f.type)]

    def write(f) -> None:
        pq.write_table(table, f, compression="zstd", use_dictionary=dict_columns)
        failpoint("score_write")   # the data is in the temporary file (or buffer), not yet under its name

    write_output(out, write)


def score(cfg: JobConfig, model_ref: str, candidates: str | Path, day: dt.date, out: str | Path, *,
          exposures: str | None = None, scoring: ScoringConfig | None = None, track: bool = True,
          progress: bool | None = None) -> ScoreOutcome:
    """Score one day's candidates with a model (registry URI or saved-model directory)."""
    sc = scoring or cfg.score
    remote = storage.is_uri(out)
    out = str(out).rstrip("/") if remote else Path(out)
    check_output(out)  # an unwritable output folder (or a missing bucket) fails before any work, naming it
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    saved = open_model(model_ref, tracking_uri(cfg))
    version = model_version_of(model_ref, tracking_uri(cfg))
    plan = resolve(sc.fusion, saved.spec.outputs, trained_keep_rate(saved))  # a factor the model cannot feed fails before any row
    timings["load_model_s"] = time.perf_counter() - t0
    t_side = time.perf_counter()   # side tables first: a bad caps or exposures file fails before any forward
    campaign_items = read_campaign(sc.campaign.items_file, sc.item_column, day) if sc.campaign.enabled else None
    caps = read_caps(sc.traffic_cap.caps_file, sc.item_column) if sc.traffic_cap.enabled else None
    seen = read_exposures(exposures or sc.traffic_cap.exposures_file, sc.item_column, day) \
        if sc.traffic_cap.enabled else None
    timings["side_tables_s"] = time.perf_counter() - t_side
    # the run opens before the candidates are read: a server that refuses this user stops the job here
    with job_run(cfg, "score", str(day), model_ref, "scored", track) as run_id:
        featurizer = Featurizer(saved.spec, saved.stats)
        reader = CandidateReader(candidate_files(candidates, day), saved.spec, sc,
                                 quarantine_dir=quarantine_dir(cfg, "candidates")
                                 / f"dt={day}")
        outputs: dict[str, list[np.ndarray]] = {}
        sides: list[pa.RecordBatch] = []
        inf = sc.inference
        t1 = time.perf_counter()
        with Progress("score", total=None, unit="rows", enabled=progress) as bar:
            overlap = overlap_pays(saved.model) if inf.overlap == "auto" else inf.overlap
            log.info("scoring with %s featurizing (score.inference.overlap: %s)",
                     "background" if overlap else "inline", inf.overlap)
            if overlap:   # reading, validating and featurizing chunk k+1 in the background during forward k
                predicted = predict_frames(saved.model, featurizer, reader.frames(), lambda f: f[0], timings,
                                           inf.forward_rows, inf.precision)
            else:
                predicted = (((rb, side), predict_rows(saved.model, featurizer, rb, timings, inf.forward_rows,
                                                       inf.precision)) for rb, side in reader.frames())
            with contextlib.closing(predicted):   # closed early on an error: the background thread stops
                for (rb, side), preds in predicted:
                    for k, v in preds.items():
                        outputs.setdefault(k, []).append(v)
                    sides.append(rb.select(side))
                    bar.update(rb.num_rows)
        loop_s = time.perf_counter() - t1
        if overlap:   # read + validate ran in the background: its own time (overlapped with the forward)
            timings["read_validate_s"] = timings.pop("source_s", 0.0)
        else:
            timings["read_validate_s"] = loop_s - timings.get("forward_s", 0.0) - timings.get("featurize_s", 0.0)
        timings["predict_s"] = loop_s   # wall time of reading + featurizing + forward together
        acc = reader.accounting
        if not sides:
            raise BadInputError(str(candidates), None, "no_rows", "no candidate row passed validation", count=acc.rows_read)
        t_assemble = time.perf_counter()
        side_table = stack_batches(sides, str(candidates))
        preds = {k: np.concatenate(v) for k, v in outputs.items()}
        keep = reader.drop_duplicates(side_table)
        if not keep.all():
            side_table = side_table.filter(pa.array(keep))
            preds = {k: v[keep] for k, v in preds.items()}
        timings["assemble_s"] = time.perf_counter() - t_assemble

        t2 = time.perf_counter()
        scored = score_candidates(side_table, preds, sc, plan, request_column=saved.spec.request_id,
                                  time_column=saved.spec.timestamp, campaign_items=campaign_items, caps=caps,
                                  exposures=seen)
        timings["rules_s"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        _write_parquet(scored.table, out)
        timings["write_s"] = time.perf_counter() - t3
        timings["total_s"] = time.perf_counter() - t0
        summary = {"date": str(day), "model_uri": model_ref, "model_version": version,
                   "rows_read": acc.rows_read, "rows_rejected": acc.rows_rejected,
                   "rejected_by_reason": dict(acc.rejected), **scored.summary,
                   "rows_out": scored.table.num_rows, "output": str(out), "formula": plan.formula(),
                   "seconds": timings, "background_featurize": overlap,
                   "balanced": acc.rows_read == scored.summary["rows_in"] + acc.rows_rejected}
        summary_path = f"{out}.summary.json" if remote else out.with_name(out.name + ".summary.json")
        write_output(summary_path, strict_json(summary))
        if track and remote:   # MLflow logs a local file: a copy under the same name, gone afterwards
            import tempfile

            with tempfile.TemporaryDirectory(prefix="mtrank-score-") as tmp:
                local = Path(tmp) / storage.name(summary_path)
                local.write_bytes(strict_json(summary))
                run_id = log_scoring(cfg, str(day), model_ref, summary, local, run_id)
        elif track:
            run_id = log_scoring(cfg, str(day), model_ref, summary, summary_path, run_id)
        return ScoreOutcome(out, summary, scored.table, run_id, saved.spec.request_id,
                            {f.column_name: f.term for f in plan.factors})


def format_lists(table: pa.Table, requests: int = 3, top: int = 8, request_column: str = "request_id",
                 item_column: str = "item_id", terms: dict[str, str] | None = None) -> str:
    """The first ranked requests as a small text table, one column per fusion factor (for the CLI),
    headed by the factor's term (`p_cart^0.2`, not `p_cart`: the column holds the factor's value)."""
    import polars as pl

    df = pl.from_arrow(table).filter(pl.col("rank").is_not_null())
    factors = [c for c in df.columns if c.startswith("factor_")]
    heads = {c: (terms or {}).get(c, c.removeprefix("factor_")).replace(" ", "") for c in factors}
    width = {c: max(9, len(h)) for c, h in heads.items()}
    first = df.get_column(request_column).unique(maintain_order=True).head(requests)
    lines = []
    for rid in first:
        rows = df.filter(pl.col(request_column) == rid).head(top)
        lines.append(f"request {rid}: {df.filter(pl.col(request_column) == rid).height} shown")
        head = "".join(f" {heads[c]:>{width[c]}}" for c in factors)
        lines.append(f"  {'rank':>4} {'item':>10} {'score':>9}{head} {'weight':>6}  rules")
        for r in rows.iter_rows(named=True):
            vals = "".join(f" {r[c]:>{width[c]}.4g}" for c in factors)
            lines.append(f"  {r['rank']:>4} {str(r[item_column]):>10} {r['score']:>9.4g}{vals} "
                         f"{r['rule_weight']:>6.2f}  {r['rules'] or '-'}")
    return "\n".join(lines)
