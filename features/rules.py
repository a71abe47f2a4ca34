"""Input rules: what makes a file or a row unusable, said in one place for validate, reader and scorer.

File-level problems (missing column, wrong type) always fail: no row of such a file can be trusted.
Row-level problems are either a failure naming file, column, rule and count, or (with
`on_bad_row: quarantine`) the rows are set aside with their reason and counted. Each rejected row
carries exactly one reason (the first rule it breaks, in spec order), so counts add up:
rows read = rows accepted + sum(rows rejected by reason).
"""
from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from mtrank.features.base import MtrankError
from mtrank.features.spec import CategoricalFeature, FeatureSpec, MultiHotFeature, NumericFeature

REASON = "_reject_reason"  # "column:rule" for rejected rows, null for accepted ones

# Rules a row can break.
NULL = "null"                   # required value missing (labels, keys, numeric without fill)
NON_FINITE = "non_finite"       # NaN or +-inf in a numeric feature or label
NOT_BINARY = "not_binary"       # binary label outside {0, 1}
NEGATIVE = "negative"           # negative target where the loss needs >= 0 (e.g. dwell seconds)
OUTSIDE_SPACE = "outside_space"  # post-click label set on a row without the click
# File-level rules.
MISSING_COLUMN = "missing_column"
WRONG_TYPE = "wrong_type"
UNREADABLE = "unreadable_file"
EMPTY_PARTITION = "empty_partition"
MISSING_PARTITION = "missing_partition"


class BadInputError(MtrankError, ValueError):
    """Input that cannot be used; names where (file), what (column) and why (rule, count)."""

    def __init__(self, file: str, column: str | None, rule: str, detail: str, count: int | None = None):
        self.file, self.column, self.rule, self.count = file, column, rule, count
        col = f" column {column!r}:" if column else ""
        n = f" ({count:,} rows)" if count is not None else ""
        super().__init__(f"{file}:{col} rule {rule}{n}: {detail}")


# ---------------------------------------------------------------------------------------------
# Schema


def _is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or \
        pa.types.is_string_view(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def is_time_type(t: pa.DataType) -> bool:
    """What a timestamp column may hold: a timestamp, a date or an integer (e.g. epoch seconds)."""
    return pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_integer(t)


def _kind_check(spec: FeatureSpec, labels: bool = True) -> dict[str, tuple[str, callable]]:
    """column -> (expected description, predicate over the Arrow type)."""
    checks: dict[str, tuple[str, callable]] = {c: ("string or integer", _is_id_type) for c in spec.group_columns}
    for f in spec.features:
        if isinstance(f, CategoricalFeature):
            checks[f.name] = ("string or integer (categorical)", _is_id_type)
        elif isinstance(f, MultiHotFeature):
            checks[f.name] = ("list of string or integer (multi_hot)",
                              lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and
                              _is_id_type(t.value_type))
        else:
            checks[f.name] = ("integer or floating (numeric)", _is_number)
    for t in spec.tasks if labels else ():
        if t.type == "binary":
            checks[t.label] = ("integer or boolean 0/1 (binary label)",
                               lambda x: pa.types.is_integer(x) or pa.types.is_boolean(x) or pa.types.is_floating(x))
        else:
            checks[t.label] = ("integer or floating (regression label)", _is_number)
    return checks


def check_schema(schema: pa.Schema, spec: FeatureSpec, source: str, labels: bool = True,
                 serving: bool = False) -> None:
    """Raise BadInputError for the first missing or mistyped column of a file.

    `labels=False` for rows that have no outcome yet; `serving` for rows ranked as serving ranks them
    (scoring candidates, fusion tuning): a feature with a `serve_value` is set there, not read."""
    names = set(schema.names)
    for col, (expected, ok) in _kind_check(spec, labels).items():
        if serving and col in spec.served_values:
            continue
        if col not in names:
            raise BadInputError(source, col, MISSING_COLUMN, f"column is required by the FeatureSpec ({expected})")
        actual = schema.field(col).type
        if not ok(actual):
            raise BadInputError(source, col, WRONG_TYPE, f"expected {expected}, found {actual}")
    ts = spec.timestamp
    if ts and ts in names:   # optional (only scoring's serving order reads it), but never of another type
        t = schema.field(ts).type
        if not is_time_type(t):
            raise BadInputError(source, ts, WRONG_TYPE, f"the spec's timestamp column must be a timestamp, date "
                                                        f"or integer, found {t}")
    for task, col in spec.ground_truth.items():
        if col in names and not _is_number(schema.field(col).type):
            raise BadInputError(source, col, WRONG_TYPE, f"ground truth of {task} must be numeric, "
                                                         f"found {schema.field(col).type}")


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class RowRule:
    column: str
    rule: str
    broken: pl.Expr  # true where the row breaks the rule (null-safe: never null itself)

    @property
    def reason(self) -> str:
        return f"{self.column}:{self.rule}"


def row_rules(spec: FeatureSpec, float_columns: frozenset[str] = frozenset(), labels: bool = True) -> list[RowRule]:
    """All row rules, in spec order. `float_columns`: columns stored as floats (can be NaN/inf).
    `labels=False`: feature rules only (scoring candidates)."""
    rules: list[RowRule] = []

    def finite(col: str) -> None:
        if col in float_columns:
            rules.append(RowRule(col, NON_FINITE, pl.col(col).is_nan().fill_null(False) |
                                 pl.col(col).is_infinite().fill_null(False)))

    rules += [RowRule(c, NULL, pl.col(c).is_null()) for c in spec.group_columns]
    for f in spec.numeric:
        if f.fill is None:
            rules.append(RowRule(f.name, NULL, pl.col(f.name).is_null()))
        finite(f.name)
    for t in spec.tasks if labels else ():
        c = pl.col(t.label)
        rules.append(RowRule(t.label, NULL, c.is_null()))
        finite(t.label)
        if t.type == "binary":
            rules.append(RowRule(t.label, NOT_BINARY, ~c.cast(pl.Float64).is_in([0.0, 1.0]).fill_null(True)))
        elif t.nonnegative_label:
            rules.append(RowRule(t.label, NEGATIVE, (c < 0).fill_null(False)))
        space = spec.space_label(t)
        if space is not None:
            rules.append(RowRule(t.label, OUTSIDE_SPACE,
                                 ((c.cast(pl.Float64) != 0) & (pl.col(space).cast(pl.Float64) == 0)).fill_null(False)))
    return rules


def reject_reason_expr(rules: list[RowRule]) -> pl.Expr:
    """First broken rule as "column:rule"; null for a clean row."""
    expr = pl.when(rules[0].broken).then(pl.lit(rules[0].reason))
    for r in rules[1:]:
        expr = expr.when(r.broken).then(pl.lit(r.reason))
    return expr.otherwise(pl.lit(None, dtype=pl.String)).alias(REASON)


def float_columns(schema: pa.Schema) -> frozenset[str]:
    return frozenset(f.name for f in schema if pa.types.is_floating(f.type))
