"""Candidate files for scoring: found, schema-checked, validated row by row, streamed.

Rows are checked with the same FeatureSpec rules as training (labels excluded: candidates have no
outcome yet) plus the scoring keys: request id and item id must be present, and an item appears at
most once per request. Bad rows fail the job naming file, column, rule and count, or (with
`on_bad_row: quarantine`) are set aside with their reason and counted:
rows read = rows scored + rows rejected.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrank.features import storage
from mtrank.features.day_folders import files_under, find_day
from mtrank.features.rules import (MISSING_COLUMN, MISSING_PARTITION, NULL, REASON, UNREADABLE, WRONG_TYPE,
                            BadInputError, RowRule, check_schema, float_columns, reject_reason_expr, row_rules)
from mtrank.features.inputs import is_list_type, plain_type, with_served_values
from mtrank.features.spec import FeatureSpec, SpecError
from mtrank.pipeline.output_files import write_atomic
from mtrank.pipeline.reader import RowAccounting, open_parquet
from mtrank.pipeline.scoring.config import ScoringConfig

DUPLICATE = "duplicate_in_request"  # the same item twice in one request


def _remote_candidate_files(uri: str, day: dt.date | None) -> list[str]:
    """candidate_files for an object-store URI: the same choices, by listing instead of stat."""
    uri = uri.rstrip("/")
    try:
        what = storage.kind(uri)
        if what == "file":
            return [uri]
        if what != "dir":
            raise BadInputError(uri, None, MISSING_PARTITION, "candidates path does not exist")
        if day is not None:
            uri = find_day(uri, day) or uri
        files = files_under(uri)
    except OSError as e:
        raise BadInputError(uri, None, UNREADABLE, f"cannot list the candidates ({storage.one_line(e)})") from None
    if not files:
        raise BadInputError(uri, None, MISSING_PARTITION, "no Parquet files of candidates here")
    return files


def candidate_files(path: str | Path, day: dt.date | None = None) -> list[str]:
    """A Parquet file; or a folder's Parquet files (its folder of DAY, `dt=DAY/` or the like, when there is one).
    `path` may be an object-store URI (s3://bucket/candidates)."""
    if storage.is_uri(path):
        return _remote_candidate_files(str(path), day)
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise BadInputError(str(p), None, MISSING_PARTITION, "candidates path does not exist")
    if day is not None:
        p = Path(find_day(p, day) or p)
    files = files_under(p)
    if not files:
        raise BadInputError(str(p), None, MISSING_PARTITION, "no Parquet files of candidates here")
    return files


@dataclass(frozen=True)
class RuleColumn:
    """A candidate column the scoring stage reads: why, whether a file must have it, and (for a
    column read as values) what it must hold, tested on each file's Arrow type before the forward."""
    column: str
    why: str
    required: bool = True
    holds: str | None = None
    accepts: Callable[[pa.DataType], bool] | None = None


def _number(t: pa.DataType) -> bool:
    t = plain_type(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)


def _window_values(t: pa.DataType) -> bool:   # one value, or a list of values (genres, tags)
    t = plain_type(t)
    if is_list_type(t):
        t = plain_type(t.value_type)
    return not pa.types.is_nested(t)


def _flag(t: pa.DataType) -> bool:   # strings as Arrow reads flags: true / false / 1 / 0
    t = plain_type(t)
    return pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def rule_columns(cfg: ScoringConfig, request_column: str) -> list[RuleColumn]:
    """Every column the keys, the fusion and the enabled rules read, one record each (a later record
    of the same column wins, as a later rule's needs are the stricter ones)."""
    cols = [RuleColumn(request_column, "the request key"), RuleColumn(cfg.item_column, "the item key (item_column)")]
    cols += [RuleColumn(c, "a fusion factor (score.fusion.factors)",
                        holds="numbers (a fusion factor's column; strings are not read as numbers)", accepts=_number)
             for c in cfg.fusion.columns]
    if cfg.window.enabled:
        cols.append(RuleColumn(cfg.window.attribute, "the N-pick-1 rule (window.attribute; disable with "
                               "window.enabled: false)", holds="one value per candidate, or a list of values "
                               "(window.attribute: a category, brand or shop; genres or tags)", accepts=_window_values))
    if cfg.new_item.enabled:
        cols.append(RuleColumn(cfg.new_item.column, "the new-item boost (new_item.column; disable with "
                               "new_item.enabled: false)", holds="numbers (new_item.column: the item's age in days)",
                               accepts=_number))
    if cfg.low_quality.enabled:
        cols.append(RuleColumn(cfg.low_quality.column, "the low-quality rule (low_quality.column; disable with "
                               "low_quality.enabled: false)", holds="numbers (low_quality.column: the item's quality)",
                               accepts=_number))
    if cfg.campaign.enabled and cfg.campaign.column:
        cols.append(RuleColumn(cfg.campaign.column, "the campaign boost (campaign.column, or give campaign.items_file)",
                               required=cfg.campaign.items_file is None,
                               holds="booleans, 0/1 integers or 'true'/'false' (campaign.column)", accepts=_flag))
    return cols


def rule_columns_needed(cfg: ScoringConfig, request_column: str) -> dict[str, str]:
    """column -> what needs it, for the columns every candidate file must have."""
    return {r.column: r.why for r in rule_columns(cfg, request_column) if r.required}


def rule_column_kinds(cfg: ScoringConfig, request_column: str = "request_id") -> dict[str, tuple[str, callable]]:
    """column -> (what it must hold, test of its Arrow type), for the columns the fusion and the rules
    read as values: checked on every file's schema before the forward, not found after it."""
    return {r.column: (r.holds, r.accepts) for r in rule_columns(cfg, request_column) if r.accepts is not None}


class CandidateReader:
    """Streams accepted candidate rows; `side` keeps the columns the rules need, `accounting` balances."""

    def __init__(self, files: list[str], spec: FeatureSpec, cfg: ScoringConfig, *,
                 quarantine_dir: str | Path | None = None, chunk_rows: int = 65_536,
                 extra_columns: tuple[str, ...] = ()):
        self.files, self.spec, self.cfg, self.chunk_rows = files, spec, cfg, chunk_rows
        self.request_column = spec.request_column("scoring")
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else None
        if cfg.on_bad_row == "quarantine" and self.quarantine_dir is None:
            raise SpecError("score.on_bad_row: quarantine needs a quarantine directory (set quarantine_dir in "
                            "the job config)")
        self.needed = rule_columns_needed(cfg, self.request_column)
        self.kinds = rule_column_kinds(cfg, self.request_column)
        side = [*self.needed, spec.timestamp, cfg.campaign.column, *extra_columns]
        self.side_columns = [c for c in dict.fromkeys(side) if c]
        self.accounting = RowAccounting()

    def _rules(self, schema: pa.Schema) -> pl.Expr:
        keys = [RowRule(c, NULL, pl.col(c).is_null()) for c in (self.request_column, self.cfg.item_column)]
        return reject_reason_expr(keys + row_rules(self.spec, float_columns(schema), labels=False))

    def _open(self, file: str) -> tuple[pq.ParquetFile, list[str], list[str]]:
        try:
            pf = open_parquet(file, self.spec)
        except (OSError, pa.ArrowException) as e:
            raise BadInputError(file, None, UNREADABLE, f"cannot open ({e})") from None
        schema = pf.schema_arrow
        check_schema(schema, self.spec, file, labels=False, serving=True)
        for col, why in self.needed.items():
            if col not in schema.names:
                raise BadInputError(file, col, MISSING_COLUMN, f"column is required by {why}")
        cols = list(dict.fromkeys([*self.spec.serving_columns, *self.side_columns]))
        side = [c for c in self.side_columns if c in schema.names]
        return pf, [c for c in cols if c in schema.names], side

    def _check_side_types(self) -> None:
        """Before any forward: each side column (keys, rule inputs) holds what the fusion and rules read
        (numbers, one value per row, flags) and one kind of value across the files. Widths may differ
        (int32 ids in one file, int64 in the next: widened when the chunks are stacked); kinds may
        not (ids as strings in one file, integers in another)."""
        first: dict[str, tuple[pa.DataType, str]] = {}
        for file in self.files:
            try:
                schema = storage.read_schema(file)
            except (OSError, pa.ArrowException):
                continue   # reported, naming the file, when it is read
            for c in self.side_columns:
                if c not in schema.names:
                    continue
                t = schema.field(c).type
                what, ok = self.kinds.get(c, (None, None))
                if ok is not None and not ok(t):
                    raise BadInputError(file, c, WRONG_TYPE, f"must hold {what}, found {t}")
                seen, where = first.setdefault(c, (t, file))
                try:
                    pa.unify_schemas([pa.schema([pa.field(c, seen)]), pa.schema([pa.field(c, t)])],
                                     promote_options="permissive")
                except (pa.ArrowTypeError, pa.ArrowInvalid):
                    raise BadInputError(file, c, WRONG_TYPE, f"{t} here but {seen} in {where}: the candidate "
                                        "files must agree on a column's kind") from None

    def frames(self) -> Iterator[tuple[pa.RecordBatch, list[str]]]:
        """(accepted rows, names of the side columns present) per chunk, files in order."""
        self._check_side_types()
        acc = self.accounting = RowAccounting()
        for file in self.files:
            pf, cols, side = self._open(file)
            acc.row_groups += pf.metadata.num_row_groups
            rules = self._rules(pf.schema_arrow)
            served = set(self.spec.served_values)
            rule_cols = sorted({self.request_column, self.cfg.item_column, *self._rule_inputs()} & (set(cols) | served))
            try:
                for i, rb in enumerate(pf.iter_batches(batch_size=self.chunk_rows, columns=cols)):
                    acc.rows_read += rb.num_rows
                    rb = with_served_values(rb, self.spec)   # position and the like: as serving sets them
                    reason = pl.from_arrow(rb.select(rule_cols)).select(rules).to_series()
                    bad = reason.is_not_null()
                    if bad.any():
                        mask = bad.to_arrow()
                        self._reject(rb.filter(mask), reason.filter(bad), file, i)
                        rb = rb.filter(pc.invert(mask))
                    acc.rows_accepted += rb.num_rows
                    if rb.num_rows:
                        yield rb, side
            except (OSError, pa.ArrowException) as e:
                raise BadInputError(file, None, UNREADABLE, f"cannot be read ({e})") from None

    def _rule_inputs(self) -> list[str]:
        spec = self.spec
        return [*spec.group_columns, *(f.name for f in spec.numeric)]

    def _reject(self, rows: pa.RecordBatch, reason: pl.Series, file: str, chunk: int) -> None:
        counts = reason.value_counts(sort=True)
        if self.cfg.on_bad_row == "fail":
            (top, n), others = counts.row(0), counts.height - 1
            column, rule = top.rsplit(":", 1)
            more = f"; {others} other problem(s) in this chunk" if others else ""
            raise BadInputError(file, column, rule, f"candidate rows break this rule{more} "
                                "(set score.on_bad_row: quarantine to set bad rows aside)", count=int(n))
        for r, c in counts.iter_rows():
            self.accounting.rejected[r] += c
        frame = pl.from_arrow(pa.Table.from_batches([rows])).with_columns(
            reason, pl.lit(file).alias("_source_file"))
        self.accounting.quarantine_files.append(self._write_quarantine(frame, f"{Path(file).stem}.c{chunk}"))

    def _write_quarantine(self, frame: pl.DataFrame, name: str) -> str:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        path = self.quarantine_dir / f"{name}.parquet"
        write_atomic(path, frame.write_parquet)  # a rerun overwrites the same name: idempotent
        return str(path)

    def drop_duplicates(self, side: pa.Table) -> np.ndarray:
        """Keep mask over the accepted rows: the first row of each (request, item) pair.

        Later copies fail the job, or are quarantined and counted (accounting moves them from
        accepted to rejected, so it still balances)."""
        keys = pl.from_arrow(side.select([self.request_column, self.cfg.item_column]))
        dup = ~keys.select(pl.struct(pl.all()).is_first_distinct()).to_series()
        n = int(dup.sum())
        keep = ~dup.to_numpy()
        if n == 0:
            return keep
        if self.cfg.on_bad_row == "fail":
            first = keys.filter(dup).row(0)
            raise BadInputError(", ".join(self.files) if len(self.files) <= 3 else f"{self.files[0]} (+{len(self.files) - 1})",
                                self.cfg.item_column, DUPLICATE,
                                f"an item appears more than once in one request (first: request {first[0]!r}, "
                                f"item {first[1]!r}); set score.on_bad_row: quarantine to keep the first copy",
                                count=n)
        rows = pl.from_arrow(side.filter(pa.array(dup.to_numpy()))).with_columns(
            pl.lit(f"{self.cfg.item_column}:{DUPLICATE}").alias(REASON))
        self.accounting.rejected[f"{self.cfg.item_column}:{DUPLICATE}"] += n
        self.accounting.rows_accepted -= n
        self.accounting.quarantine_files.append(self._write_quarantine(rows, "duplicates"))
        return keep
