"""`mtrank init-spec`: propose a commented FeatureSpec YAML from Parquet logs.

One statistics pass (polars, vectorised, lazy; at most `max_rows` rows: the first rows of every file
in proportion to its size; a few columns per query, so memory is bounded by max_rows, not by the data)
gives per column: nulls, distinct count, quantiles of numbers, share of negatives, distinct elements
of lists; one more query counts, per pair of labels, rows where one is set and the other is not.
From those and the Arrow types the rules below propose kinds, transforms, bucket counts, tasks and
their spaces. The text is checked by the strict FeatureSpec parser before it is returned,
so what `init-spec` writes always loads; it is a proposal to review, not a decision.

Kinds (Arrow type of the first file that has the column):
  string / large_string / string_view / dictionary -> categorical
  integer -> categorical when the name looks like an identifier (see `_ID_NAME`: `id`, `*_id`,
             `userId`, `*_key`, `*_code`, `*_type`, `*_level`, ...) or the column holds at most two
             distinct values (a flag); otherwise numeric (ages, counts, amounts). `--categorical COL`
             and `--numeric COL` override.
  floating -> numeric;  list<string | integer> -> multi_hot
  boolean -> not a feature: the reader hashes strings and integers only (features/rules.py); cast to int8
  timestamp / date / time / duration, decimal, binary, struct, map -> not features
Never features: labels, the request id (unless `--categorical` names it too), the timestamp,
`--exclude`d columns, constant columns, `true_*` columns (a generator's hidden truth;
`true_p_<label>` / `true_<label>` become ground_truth), strings that are all YYYY-MM-DD dates (a
partition column), and numbers that are non-zero only on rows where a binary label is 1 (an outcome
observed after that label: a leak; `--label` trains it).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import yaml

from mtrank.features import storage
from mtrank.features.inputs import is_list_type, plain_type
from mtrank.features.day_folders import LAYOUT, day_map, files_under, no_days_hint
from mtrank.features.rules import MISSING_COLUMN, MISSING_PARTITION, UNREADABLE, WRONG_TYPE, BadInputError
from mtrank.features.spec import SpecError, parse_spec

DEFAULT_HASH_SEED = 20261121
DEFAULT_COLLISION_TARGET = 0.01
DEFAULT_MAX_ROWS = 1_000_000
DEFAULT_MAX_BUCKETS = 1 << 20      # 1,048,576 rows x 16 floats = 64 MiB per table
# Numerics with at least PLE_MIN_DISTINCT distinct values get the piecewise-linear encoding over PLE_BINS
# quantile bins and keep their standardised value as one more column: on UCI Adult (bench/real_bench.py)
# it lifted high_income AUC from 0.898 to 0.913-0.914 (bins 8: 0.912, 16: 0.912, 16 + value: 0.913, 32: 0.914).
PLE_MIN_DISTINCT = 16
PLE_BINS = 32
# Categoricals with at least ID_MIN_DISTINCT distinct values (user, item, shop ids) get ID_OPTIONS:
# values seen fewer than 5 times in the training window, and values never seen, share the table's
# rare row. Measured on MovieLens-100K (bench/id_embedding_bench.py, docs/training.md "Id embeddings
# that generalise"): see bench/README.md for the study behind the choice.
ID_MIN_DISTINCT = 500
ID_OPTIONS = {"min_count": 5}
MIN_BUCKETS = 16
COLUMNS_PER_QUERY = 6              # columns whose statistics one query computes (bounds memory)
SIGNIFICANCE = 1e-6                # chance that an implication seen in the sample is a coincidence
MISSING_MARKERS = ("?", "", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "-")

_DATE_TEXT = r"^\d{4}-\d{2}-\d{2}$"
# Integer columns that are identifiers (hashed) rather than quantities (scaled).
_ID_NAME = re.compile(r"(?:^|[_\-. ])(?:id|ids|key|code|hash|uuid|guid|sku|type|kind|level|bucket|band|class|"
                      r"category|cat|group|segment|zip|zipcode|postcode|index|idx)$")
_CAMEL_ID = re.compile(r"[a-z0-9](?:Id|ID|Key|Code|Type)$")
_TIMESTAMP_NAMES = ("ts", "timestamp", "event_time", "event_ts", "time")
# Integer columns holding the slot an item was shown in: hashed, and served at the top slot.
_SLOT_NAME = re.compile(r"^(?:position|pos|slot|display_position|rank_position|item_position)$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Bucket sizing


def bucket_count(distinct: int, target: float = DEFAULT_COLLISION_TARGET, minimum: int = MIN_BUCKETS,
                 maximum: int = DEFAULT_MAX_BUCKETS) -> int:
    """Rows of a hashed table for `distinct` values at a collision target.

    Ids 1..B-1 take values (0 is null). n values hashed into m = B-1 slots: a value shares its id with
    another with probability 1 - (1 - 1/m)^(n-1) ~ 1 - exp(-n/m) ~ n/m, so B is the next power of two
    with B - 1 >= n / target, at least `minimum`, at most `maximum` (the cap wins)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"collision target must be in (0, 1), got {target}")
    need = math.ceil(max(distinct, 0) / target) + 1
    b = 1 << max(need - 1, 1).bit_length()
    return int(min(max(b, minimum, 2), max(maximum, 2)))


def expected_collision_rate(distinct: int, buckets: int) -> float:
    """Expected share of values whose id some other value also hashes to."""
    m = buckets - 1
    if distinct <= 1 or m < 1:
        return 0.0
    return 1.0 - (1.0 - 1.0 / m) ** (distinct - 1)


def expected_lost_rate(distinct: int, buckets: int) -> float:
    """Expected 1 - distinct ids / distinct values: the `collide` column of `mtrank validate` (~half the above)."""
    m = buckets - 1
    if distinct <= 1 or m < 1:
        return 0.0
    return 1.0 - m * (1.0 - (1.0 - 1.0 / m) ** distinct) / distinct


# ---------------------------------------------------------------------------------------------
# Options and input files


@dataclass
class InferOptions:
    tasks: list[tuple[str, str]]                      # (task name, label column), in order
    parents: dict[str, str] = field(default_factory=dict)   # task -> parent task, or "none"/"all"
    exclude: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    group_key: str | None = None
    request_id: str | None = None
    timestamp: str | None = None
    collision_target: float = DEFAULT_COLLISION_TARGET
    hash_seed: int = DEFAULT_HASH_SEED
    max_rows: int = DEFAULT_MAX_ROWS
    max_buckets: int = DEFAULT_MAX_BUCKETS


@dataclass(frozen=True)
class InputFiles:
    root: str
    files: list[str]
    rows: list[int]                 # rows per file (Parquet footers)
    partitions: list[str]           # day folder names (dt=YYYY-MM-DD, …), empty for a plain folder or one file
    layout: str                     # "partitions" | "folder" | "file"


def _remote_files(root: str) -> tuple[list[str], list[str], str]:
    """find_files' choice for an object-store URI: (files, partitions, layout)."""
    root = root.rstrip("/")
    try:
        what = storage.kind(root)
        if what == "file":
            return [root], [], "file"
        if what != "dir":
            raise BadInputError(root, None, MISSING_PARTITION, "no such file or directory")
        entries = storage.list_dir(root)
        days = list(day_map(root, [(storage.name(u), u) for u, is_dir in entries if is_dir]).values())
        if days:
            files = [f for d in days for f in files_under(d)]
            return files, [storage.name(d) for d in days], "partitions"
        return [u for u, is_dir in entries if not is_dir and u.endswith(".parquet")], [], "folder"
    except OSError as e:
        raise BadInputError(root, None, UNREADABLE, f"cannot list ({storage.one_line(e)})") from None


def find_files(root: str | Path) -> InputFiles:
    """DIR's day folders (dt=YYYY-MM-DD/ and the like), else DIR/*.parquet, else one .parquet file; footers read.
    `root` may be an object-store URI (s3://bucket/logs)."""
    p = Path(root)
    parts: list[str] = []
    if storage.is_uri(root):
        files, parts, layout = _remote_files(str(root))
    elif p.is_file():
        files, layout = [p], "file"
    elif p.is_dir():
        days = list(day_map(str(p), [(d.name, d) for d in p.iterdir() if d.is_dir()]).values())
        if days:
            files = [f for d in days for f in files_under(d)]
            parts, layout = [d.name for d in days], "partitions"
        else:
            files, layout = sorted(p.glob("*.parquet")), "folder"
    else:
        raise BadInputError(str(p), None, MISSING_PARTITION, "no such file or directory")
    if not files:
        hint = no_days_hint([d.name for d in p.iterdir() if d.is_dir()]) if p.is_dir() else ""
        raise BadInputError(str(root).rstrip("/") if storage.is_uri(root) else str(p), None, MISSING_PARTITION,
                            f"no Parquet files: expected {LAYOUT}, "
                            f"a folder of .parquet files, or one .parquet file{hint}")
    rows = []
    for f in files:
        try:
            rows.append(storage.parquet_file(str(f)).metadata.num_rows)
        except (OSError, pa.ArrowException) as e:
            raise BadInputError(str(f), None, UNREADABLE, f"not a readable Parquet file ({e})") from None
    return InputFiles(str(root), [str(f) for f in files], rows, parts, layout)


def _merged_schema(files: list[str]) -> tuple[dict[str, pa.DataType], dict[str, str]]:
    """column -> Arrow type and the file it was first seen in (columns in first-seen order)."""
    types: dict[str, pa.DataType] = {}
    where: dict[str, str] = {}
    for f in files:
        try:
            schema = storage.read_schema(f)
        except (OSError, pa.ArrowException) as e:
            raise BadInputError(f, None, UNREADABLE, f"not a readable Parquet file ({e})") from None
        for fld in schema:
            if fld.name not in types:
                types[fld.name], where[fld.name] = fld.type, f
            elif _class(fld.type) != _class(types[fld.name]):
                raise BadInputError(f, fld.name, WRONG_TYPE, f"{fld.type} here but {types[fld.name]} in "
                                    f"{where[fld.name]}: one column needs one kind of type in every file")
    return types, where


def _sample(inp: InputFiles, max_rows: int) -> tuple[pl.LazyFrame, int]:
    """At most max_rows rows, taken from every file in proportion to its size (lazy)."""
    total = sum(inp.rows)
    if total <= max_rows:
        takes = list(inp.rows)
    else:
        takes = [n * max_rows // total for n in inp.rows]
        short = max_rows - sum(takes)
        for i in sorted(range(len(takes)), key=lambda i: inp.rows[i] - takes[i], reverse=True)[:short]:
            takes[i] += 1
    frames = [storage.scan_parquet(f, hive_partitioning=False).head(k) for f, k in zip(inp.files, takes) if k > 0]
    return pl.concat(frames, how="diagonal_relaxed"), sum(takes)


# ---------------------------------------------------------------------------------------------
# Column classes


def _is_text(t: pa.DataType) -> bool:
    t = plain_type(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_temporal(t: pa.DataType) -> bool:
    return pa.types.is_temporal(t)


def _class(t: pa.DataType) -> str:
    """text | int | float | bool | list | temporal | other"""
    if _is_text(t):
        return "text"
    if pa.types.is_integer(plain_type(t)):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if is_list_type(t):
        return "list"
    if _is_temporal(t):
        return "temporal"
    return "other"


def looks_like_id(name: str) -> bool:
    return bool(_ID_NAME.search(name.lower()) or _CAMEL_ID.search(name) or name.lower() == "id")


# ---------------------------------------------------------------------------------------------
# Statistics


def _num(c: str) -> pl.Expr:
    return pl.col(c).cast(pl.Float64)


def _finite(c: str) -> pl.Expr:
    x = _num(c)
    return x.filter(x.is_finite())


def _stat_exprs(c: str, cls: str, inner: str | None) -> list[pl.Expr]:
    k = f"{c}\x00"
    out = [pl.col(c).null_count().alias(k + "nulls")]
    if cls in ("text", "int", "float", "bool"):
        out.append(pl.col(c).drop_nulls().n_unique().alias(k + "distinct"))
    if cls == "text":
        s = pl.col(c).cast(pl.String)
        out += [s.is_in(list(MISSING_MARKERS)).sum().alias(k + "markers"),
                s.drop_nulls().str.contains(_DATE_TEXT).all().alias(k + "dates")]
    if cls in ("int", "float", "bool"):
        f = _finite(c)
        x = _num(c)
        out += [f.min().alias(k + "min"), f.max().alias(k + "max"),
                *(f.quantile(q, interpolation="nearest").alias(k + name)
                  for q, name in ((0.01, "p01"), (0.5, "p50"), (0.99, "p99"))),
                (x < 0).sum().alias(k + "negative"),
                (x.is_not_null() & ~x.is_finite()).sum().alias(k + "nonfinite"),
                (x.is_not_null() & (x != 0)).sum().alias(k + "nonzero"),
                x.is_in([0.0, 1.0]).or_(x.is_null()).all().alias(k + "zero_one"),
                (x == 1).sum().alias(k + "ones")]
    if cls == "list" and inner is not None:
        e = pl.col(c).explode().drop_nulls()
        out += [e.n_unique().alias(k + "distinct"), pl.col(c).list.len().mean().alias(k + "mean_len")]
    return out


def _unpack(row: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, v in row.items():
        c, stat = key.split("\x00", 1)
        out.setdefault(c, {})[stat] = v
    return out


def _collect(lf: pl.LazyFrame, exprs: list[pl.Expr]) -> dict:
    if not exprs:
        return {}
    try:
        return lf.select(exprs).collect(engine="streaming").row(0, named=True)
    except pl.exceptions.PolarsError as e:
        raise BadInputError("<statistics pass>", None, UNREADABLE, f"cannot compute column statistics ({e})") from None


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def _g(x: float | int | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.4g}"


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _flow(d: dict) -> str:
    return yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10**9).strip()


def _scalar(v: object) -> str:
    return yaml.safe_dump([v], default_flow_style=True, width=10**9).strip()[1:-1]


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _pct(a: int, b: int) -> str:
    return f"{a / b:.2%}" if b else "-"


def _nulls(n: int, rows: int) -> str:
    return f"{n:,} nulls ({_pct(n, rows)})" if n else "no nulls"


# ---------------------------------------------------------------------------------------------
# Inference


@dataclass
class InferredSpec:
    text: str
    features: int
    tasks: int
    rows_sampled: int
    rows_total: int
    files: int


def _skewed(s: dict) -> bool:
    p50, p99, mx = s["p50"], s["p99"], s["max"]
    if mx is None or p50 is None:
        return False
    if p50 <= 0:
        return mx > 0
    return p99 > 10 * p50 or mx > 100 * p50


def _numeric_feature(c: str, s: dict, typ: pa.DataType, rows: int) -> tuple[dict, str]:
    d: dict = {"name": c, "kind": "numeric"}
    notes = []
    if s["nulls"]:
        d["fill"] = _round(s["p50"])
        notes.append(f"nulls -> fill median {_g(d['fill'])}")
    lo, hi = (s["p01"], s["p99"]) if s["p01"] < s["p99"] else (s["min"], s["max"])
    d["clip"] = [_round(lo), _round(hi)]
    if d["clip"][0] > d["clip"][1]:
        d["clip"] = [d["clip"][1], d["clip"][0]]
    if s["min"] >= 0 and s["max"] > 1 and _skewed(s):
        d["log1p"] = True
        notes.append("log1p: non-negative and skewed (p99 > 10 x p50 or max > 100 x p50)")
    d["standardize"] = True
    if s["distinct"] >= PLE_MIN_DISTINCT:
        d.update(encoding="piecewise_linear", bins=PLE_BINS, keep_value=True)
        notes.append(f"piecewise-linear over {PLE_BINS} quantile bins + the standardised value: "
                     f">= {PLE_MIN_DISTINCT} distinct values")
    stats = (f"{typ}, {_g(s['distinct'])} distinct, {_nulls(s['nulls'], rows)}; min {_g(s['min'])} "
             f"p01 {_g(s['p01'])} p50 {_g(s['p50'])} p99 {_g(s['p99'])} max {_g(s['max'])}; "
             f"{_pct(s['negative'], rows)} negative")
    if s["nonfinite"]:
        notes.append(f"{_g(s['nonfinite'])} NaN/inf rows are rejected by rule non_finite (fill covers nulls only)")
    return d, "; ".join([stats, *notes])


class _Inference:
    """The steps of one `infer_spec` call, sharing the data's schema and statistics."""

    def __init__(self, root: str | Path, opt: InferOptions):
        self.root, self.opt = root, opt
        self.names = [t for t, _ in opt.tasks]
        self.labels = [c for _, c in opt.tasks]
        self.task_of = dict(zip(self.labels, self.names))
        self.inp = find_files(root)
        self.types, self.where = _merged_schema(self.inp.files)
        self.bad: list[str] = []               # "column:rule rows" the sample would reject

    # ---- arguments against the data ------------------------------------------------------
    def check_columns(self) -> None:
        opt, types, where = self.opt, self.types, self.where
        for c in self.labels:
            self._need(c, "label column")
        for c in opt.exclude:
            self._need(c, "--exclude column")
        for c in [*opt.categorical, *opt.numeric]:
            self._need(c, "--categorical/--numeric column")
        self._need(opt.group_key, "--group-key column")
        self._need(opt.request_id, "--request-id column")
        self._need(opt.timestamp, "--timestamp column")
        for a, b, what in ((self.labels, opt.exclude, "a label and --exclude'd"),
                           (opt.categorical, opt.numeric, "both --categorical and --numeric"),
                           (self.labels, [*opt.categorical, *opt.numeric], "a label and --categorical/--numeric")):
            clash = sorted(set(a) & set(b))
            if clash:
                raise SpecError(f"column {clash[0]!r} is {what}")
        for c in opt.categorical:
            if _class(types[c]) not in ("text", "int"):
                raise BadInputError(where[c], c, WRONG_TYPE, f"--categorical needs a string or integer column, "
                                    f"found {types[c]}")
        for c in opt.numeric:
            if _class(types[c]) not in ("int", "float"):
                raise BadInputError(where[c], c, WRONG_TYPE, f"--numeric needs an integer or floating column, "
                                    f"found {types[c]}")
        for c in self.labels:
            t = types[c]
            if _class(t) == "text":
                raise BadInputError(where[c], c, WRONG_TYPE, f"label is a {t} column, but the reader takes labels as "
                                    "integer, boolean or floating (binary: 0/1; features/rules.py); derive a 0/1 int8 "
                                    f"column first (e.g. {c} == '<positive value>') and pass that as --label")
            if _class(t) not in ("int", "float", "bool"):
                raise BadInputError(where[c], c, WRONG_TYPE, f"label is a {t} column, but the reader takes labels as "
                                    "integer, boolean or floating (features/rules.py)")
        if opt.group_key is not None and _class(types[opt.group_key]) not in ("text", "int"):
            raise BadInputError(where[opt.group_key], opt.group_key, WRONG_TYPE,
                                f"group key must be a string or integer column, found {types[opt.group_key]}")

    def _need(self, col: str | None, what: str) -> None:
        if col is not None and col not in self.types:
            cols = list(self.types)
            raise BadInputError(self.inp.files[0], col, MISSING_COLUMN, f"{what} not found in the data ({len(cols)} "
                                f"columns: {', '.join(cols[:12])}{', ...' if len(cols) > 12 else ''})")

    def propose_keys(self) -> None:
        """Request id and timestamp: as given, else a column named request_id / a timestamp-typed column."""
        opt, types = self.opt, self.types
        self.request_id = opt.request_id or ("request_id" if "request_id" in types else None)
        self.stamps = [c for c, t in types.items() if pa.types.is_timestamp(t) and c not in self.labels]
        self.timestamp = opt.timestamp
        if self.timestamp is None and self.stamps:
            named = [c for c in self.stamps if c.lower() in _TIMESTAMP_NAMES]
            self.timestamp = (named or self.stamps)[0]

    # ---- statistics ------------------------------------------------------------------------
    def column_stats(self) -> None:
        """Pass 1: per-column statistics, a few columns per query: memory ~ max_rows x COLUMNS_PER_QUERY."""
        self.lf, self.sampled = _sample(self.inp, self.opt.max_rows)
        self.total = sum(self.inp.rows)
        self.stats: dict[str, dict] = {}
        cols = list(self.types)
        for i in range(0, len(cols), COLUMNS_PER_QUERY):
            exprs = []
            for c in cols[i:i + COLUMNS_PER_QUERY]:
                t = self.types[c]
                inner = None
                if is_list_type(t):
                    vt = t.value_type
                    inner = "id" if (_is_text(vt) or pa.types.is_integer(plain_type(vt))) else None
                exprs += _stat_exprs(c, _class(t), inner)
            self.stats.update(_unpack(_collect(self.lf, exprs)))
        self.bin_labels = [c for c in self.labels if self.stats[c].get("zero_one")]
        self.reg_labels = [c for c in self.labels if c not in self.bin_labels]
        self.gt_cols: dict[str, str] = {}     # task -> its hidden-truth column
        for c in self.labels:
            for cand in (f"true_p_{c}", f"true_{c}"):
                if cand in self.types and _class(self.types[cand]) in ("int", "float") and cand not in self.opt.exclude:
                    self.gt_cols[self.task_of[c]] = cand
                    break

    def relations(self) -> None:
        """Pass 2: for label pairs and outcome-looking numbers, rows where a is non-zero but b is not 1."""
        special = {*self.labels, *self.opt.exclude, self.request_id, self.timestamp, *self.gt_cols.values(),
                   *self.opt.categorical, *self.opt.numeric}
        self.leak_candidates = [c for c, t in self.types.items() if c not in special and not c.startswith("true_")
                                and _class(t) in ("int", "float", "bool")]
        exprs = []
        for a in [*self.labels, *self.leak_candidates]:
            nonzero = (_num(a) == 1) if a in self.bin_labels else (_num(a) != 0).fill_null(False)
            for b in self.bin_labels:
                if a != b:
                    exprs.append((nonzero & (_num(b) != 1).fill_null(True)).sum().alias(f"{a}\x00{b}"))
        self.rel = {tuple(k.split("\x00")): int(v) for k, v in _collect(self.lf, exprs).items()}

    def implies(self, a: str, b: str) -> bool:
        """a is non-zero only where binary label b is 1, on enough rows not to be chance."""
        count = self.stats[a]["ones"] if a in self.bin_labels else self.stats[a].get("nonzero") or 0
        r = self.stats[b]["ones"] / self.sampled if self.sampled else 0.0
        return (count > 0 and self.rel.get((a, b)) == 0 and r < 1.0
                and count * math.log(max(r, 1e-300)) < math.log(SIGNIFICANCE))

    # ---- tasks ---------------------------------------------------------------------------------
    def propose_spaces(self) -> None:
        """label -> label of its space: the binary root with fewest positives it implies; --parent overrides."""
        stats, bins = self.stats, self.bin_labels
        sup = {a: [b for b in bins if b != a and stats[b]["ones"] > stats[a]["ones"] and self.implies(a, b)]
               for a in bins}
        roots = [a for a in bins if not sup[a]]
        space: dict[str, str] = {}
        for a in self.labels:
            cands = [b for b in (sup[a] if a in sup else bins) if b in roots and b != a and
                     (a in sup or self.implies(a, b))]
            if cands:
                space[a] = min(cands, key=lambda b: (stats[b]["ones"], bins.index(b)))
        self.inferred_space = dict(space)
        label_of = dict(zip(self.names, self.labels))
        tasks = ", ".join(self.names)
        for child, parent in self.opt.parents.items():
            if child not in label_of:
                raise SpecError(f"--parent {child}={parent}: unknown task {child!r} (tasks: {tasks})")
            if parent.lower() in ("none", "all"):
                space.pop(label_of[child], None)
                continue
            if parent not in label_of:
                raise SpecError(f"--parent {child}={parent}: unknown task {parent!r} (tasks: {tasks})")
            if label_of[parent] not in bins:
                raise SpecError(f"--parent {child}={parent}: {parent!r} is not a binary task (its label is not 0/1)")
            space[label_of[child]] = label_of[parent]
        for c, s in space.items():
            if s in space:
                raise SpecError(f"task {self.task_of[c]!r} would be trained on the positives of task "
                                f"{self.task_of[s]!r}, which itself is trained on the positives of task "
                                f"{self.task_of[space[s]]!r}; a space must be a binary task trained on all rows "
                                "(use --parent to choose)")
        self.space = space

    def task_lines(self) -> list[str]:
        out: list[str] = []
        products: set[str] = set()
        n = self.sampled
        for name, c in self.opt.tasks:
            s, sp = self.stats[c], self.space.get(c)
            d: dict = {"name": name, "label": c}
            if c in self.bin_labels:
                d.update(type="binary", loss="bce")
                rows = n - s["nulls"]
                info = f"binary: {_pct(s['ones'], rows)} positive ({_g(s['ones'])} of {_g(rows)})"
                if s["ones"] in (0, rows):
                    info += "; WARNING: only one value in the sample"
            else:
                skewed = s["min"] is not None and s["min"] >= 0 and _skewed(s)
                d.update(type="regression", loss="mse_log1p" if skewed else "mse")
                info = (f"regression: min {_g(s['min'])} p50 {_g(s['p50'])} p99 {_g(s['p99'])} max {_g(s['max'])}; "
                        + ("non-negative and skewed -> mse_log1p" if skewed else "mse"))
            d["weight"] = 1.0
            d["space"] = self.task_of[sp] if sp else "all"
            if sp:
                how = "--parent" if self.inferred_space.get(c) != sp else "inferred"
                parent = self.task_of[sp]
                if c in self.bin_labels:
                    d["parent"] = parent
                    product = f"{parent}_{name}"
                    if product in self.names or product in products:
                        d["product"] = product = f"{product}_product"
                    products.add(product)
                    info += (f"; {c} = 1 only where {sp} = 1 ({how}): trained on {parent}'s positives, "
                             f"entire-space product {product}")
                else:
                    info += f"; non-zero only where {sp} = 1 ({how}): trained on {parent}'s positives"
            outside = self.rel.get((c, sp), 0) if sp else 0
            if s["nulls"] or s.get("nonfinite"):
                info += f"; {_g(s['nulls'])} null / {_g(s.get('nonfinite') or 0)} NaN-inf labels: rows rejected"
            self.bad += [f"{c}:{rule} {k:,}" for rule, k in (("null", s["nulls"]), ("non_finite", s.get("nonfinite")),
                                                             ("outside_space", outside)) if k]
            out.append(f"  # {_clean(name)}: {_clean(info)}")
            if outside:
                out.append(f"  # WARNING: {outside:,} sampled rows have {_clean(c)} != 0 where {_clean(sp)} != 1: "
                           "validate rejects them (rule outside_space)")
            out.append(f"  - {_flow(d)}")
        return out

    # ---- features ------------------------------------------------------------------------------
    def feature_lines(self) -> tuple[dict[str, list[str]], list[tuple[str, str]], int]:
        """({section: lines}, skipped (column, why), number of features)."""
        sections: dict[str, list[str]] = {"categorical": [], "multi_hot": [], "numeric": []}
        skipped: list[tuple[str, str]] = []
        for c, t in self.types.items():
            if c in self.task_of:
                continue
            got = self._feature(c, t)
            if isinstance(got, str):
                skipped.append((c, got))
            else:
                kind, comment, d = got
                sections[kind] += [f"  # {_clean(c)}: {_clean(comment)}", f"  - {_flow(d)}"]
        return sections, skipped, sum(len(v) for v in sections.values()) // 2

    def _feature(self, c: str, t: pa.DataType) -> str | tuple[str, str, dict]:
        """(kind, comment, entry) of a feature, or why the column is not one."""
        opt, cls, s, n = self.opt, _class(t), self.stats.get(c, {}), self.sampled
        forced = "categorical" if c in opt.categorical else "numeric" if c in opt.numeric else None
        truth = {v: k for k, v in self.gt_cols.items()}
        if c in opt.exclude:
            return "--exclude"
        if c == self.request_id and forced is None:   # an explicit --categorical keeps it a feature too
            return "request id (--categorical also hashes it as a feature: a user id that groups the lists)"
        if c == self.timestamp:
            return "timestamp"
        if c in truth:
            return f"ground truth of task {truth[c]}"
        if c.startswith("true_") and not forced:
            return "true_* column: a generator's hidden truth, never an input"
        if cls == "temporal":
            return f"{t}: time columns are not features"
        if cls == "bool":
            return "boolean: the reader hashes strings and integers only; cast to int8 to use it"
        if cls == "other":
            return f"{t}: no feature kind reads this type"
        nulls, distinct = s.get("nulls", 0), s.get("distinct", 0)
        if nulls == n:
            return "all null in the sample"
        if cls == "list":
            if not (_is_text(t.value_type) or pa.types.is_integer(plain_type(t.value_type))):
                return f"{t}: multi_hot needs a list of strings or integers"
            if not distinct:
                return "lists are all empty or null in the sample"
            return self._hashed(c, distinct, "multi_hot", f"{t}, {_g(distinct)} distinct elements, "
                                f"{s['mean_len']:.2f} per row on average, "
                                f"{_nulls(nulls, n).replace('nulls', 'null lists')}")
        slot = cls == "int" and forced is None and _SLOT_NAME.match(c) is not None and s.get("min") is not None
        numeric = forced == "numeric" or (forced is None and (cls == "float" or (
            cls == "int" and not looks_like_id(c) and not slot and distinct > 2)))
        if distinct <= 1 and (numeric or not nulls):
            only = f" ({_g(s['min'])})" if s.get("min") is not None else ""
            return f"constant{only}{' apart from nulls (a 0/1 presence flag would carry it)' if nulls else ''}"
        leak = [b for b in self.bin_labels if c in self.leak_candidates and self.implies(c, b)]
        if leak:
            b = min(leak, key=lambda b: self.stats[b]["ones"])
            return (f"non-zero only on rows where {b} = 1 ({_g(s['nonzero'])} rows): looks like an outcome observed "
                    f"after {b}; --label {c} trains it, --numeric/--categorical {c} keeps it as a feature")
        if cls == "text" and s.get("dates") and forced is None:
            return "every value is a YYYY-MM-DD date (a partition column)"
        if numeric:
            d, comment = _numeric_feature(c, s, t, n)
            if s["nonfinite"]:
                self.bad.append(f"{c}:non_finite {s['nonfinite']:,}")
            if cls == "int" and forced is None:
                comment = "read as a quantity (name not id-like; --categorical hashes it); " + comment
            return "numeric", comment, d
        if cls == "text":
            detail = f"{t}, {_g(distinct)} distinct, {_nulls(nulls, n)}"
            if s.get("markers"):
                detail += f"; {_pct(s['markers'], n)} are '?', '', 'NA'-like missing markers (hashed as a value)"
        elif slot:   # position bias: learnt from the logged slots, held at the top slot when ranking
            top = int(s["min"])
            kind, comment, d = self._hashed(c, distinct, "categorical", f"{t} (the slot an item was shown in), "
                                            f"{_g(distinct)} distinct, {_nulls(nulls, n)}")
            d["serve_value"] = top
            return kind, (f"{comment}; serve_value {top}: scoring ranks every candidate as if shown in the top "
                          "slot (position bias learnt in training only; candidates need no such column)"), d
        else:
            why = "--categorical" if forced else "id-like name" if looks_like_id(c) else "at most two values: a flag"
            detail = f"{t} ({why}), {_g(distinct)} distinct, {_nulls(nulls, n)}"
        return self._hashed(c, distinct, "categorical", detail)

    def _hashed(self, c: str, distinct: int, kind: str, detail: str) -> tuple[str, str, dict]:
        b = bucket_count(distinct, self.opt.collision_target, maximum=self.opt.max_buckets)
        capped = bucket_count(distinct, self.opt.collision_target, maximum=1 << 62) > b
        d: dict = {"name": c, "kind": kind, "buckets": b}
        if kind == "multi_hot":
            d["pooling"] = "mean"
        elif distinct >= ID_MIN_DISTINCT:   # a high-cardinality id: rare and unseen ids share one row
            d.update(ID_OPTIONS)
            detail += "; " + ", ".join(f"{k} {v}" for k, v in ID_OPTIONS.items()) + \
                " (ids seen fewer times share a rare row)"
        return kind, (f"{detail}; {b:,} buckets{' (capped by --max-buckets)' if capped else ''}: expected "
                      f"{expected_collision_rate(distinct, b):.2%} of values share an id "
                      f"(validate's collide ~{expected_lost_rate(distinct, b):.2%})"), d

    # ---- text ----------------------------------------------------------------------------------
    def header(self) -> list[str]:
        inp, opt, n, total = self.inp, self.opt, self.sampled, self.total
        where_from = (f" in {len(inp.partitions)} day partitions ({inp.partitions[0]} .. {inp.partitions[-1]})"
                      if inp.layout == "partitions" else " in a folder without day partitions"
                      if inp.layout == "folder" else "")
        lines = [
            "# FeatureSpec proposed by `mtrank init-spec` -- review it before training.",
            f"# Data: {_clean(inp.root)}: {len(inp.files)} Parquet file(s){where_from}, {total:,} rows;",
            f"# statistics over {n:,} of them"
            f"{' (all)' if n == total else ' (the first rows of every file, in proportion to its size)'}.",
            "# Kinds: strings -> categorical; integers -> categorical when the name looks like an id (or <= 2 "
            "values),",
            "#   else numeric; floats -> numeric; list<string|int> -> multi_hot (--categorical / --numeric override);",
            "#   an integer slot column (position, pos, slot) -> categorical with serve_value = the top slot seen.",
            "# Numeric: fill = median when nulls exist; clip = [p01, p99] (or [min, max] when those meet);",
            "#   log1p when min >= 0, max > 1 and p99 > 10 x p50 or max > 100 x p50; standardize;",
            f"#   >= {PLE_MIN_DISTINCT} distinct values: also encoding piecewise_linear ({PLE_BINS} quantile bins, "
            "keep_value).",
            f"# Buckets: next power of two B with B - 1 >= distinct / {opt.collision_target:g} (min {MIN_BUCKETS}, "
            f"max {opt.max_buckets:,}):",
            "#   n values in B - 1 ids share an id with probability ~ 1 - exp(-n / (B - 1)).",
            "# Spaces: a binary label that is 1 only where another (with more positives) is 1 is trained on that",
            "#   task's positives with it as entire-space parent; a regression label non-zero only there likewise.",
        ]
        if inp.layout != "partitions":
            lines.append(f"# Note: train and validate read day partitions: {LAYOUT};")
            lines.append(f"#   mtrank partition --data {inp.root} --time-column COLUMN --out DIR lays this input out by day.")
        if n < total:
            lines.append("# Distinct counts are those of the sample: the full data (and later days) may hold more.")
        others = [x for x in self.stamps if x != self.timestamp]
        bad = (f"; the sample has rows that break row rules ({', '.join(self.bad)}): with fail, validate and train "
               "stop at the first such file") if self.bad else ""
        return lines + [
            "version: 1",
            f"hash_seed: {opt.hash_seed}",
            "embedding_dim: 16",
            f"on_bad_row: fail            # fail | quarantine{bad}",
            f"request_id: {_scalar(self.request_id)}"
            + ("" if self.request_id else "            # no request id column: scoring and fusion tuning need one"),
            f"group_key: {_scalar(opt.group_key)}"
            + ("" if opt.group_key else "             # no --group-key: no GAUC"),
            f"timestamp: {_scalar(self.timestamp)}"
            + (f"  # other time columns: {', '.join(others)}" if others else ""),
        ]


def infer_spec(root: str | Path, opt: InferOptions) -> InferredSpec:
    """The proposed FeatureSpec YAML (commented) for the logs under `root`; checked to load strictly."""
    if not opt.tasks:
        raise SpecError("name at least one label column (--label COL or --task NAME=COL)")
    if not 0.0 < opt.collision_target < 1.0:
        raise SpecError(f"--collision-target must be in (0, 1), got {opt.collision_target}")
    if not 0 <= opt.hash_seed < 2**64:
        raise SpecError(f"--hash-seed must be in [0, 2^64), got {opt.hash_seed}")
    if opt.max_rows < 1 or opt.max_buckets < 2:
        raise SpecError("--max-rows must be >= 1 and --max-buckets >= 2")
    for what, seq in (("task name", [t for t, _ in opt.tasks]), ("label column", [c for _, c in opt.tasks])):
        dup = sorted({x for x in seq if seq.count(x) > 1})
        if dup:
            raise SpecError(f"{what} {dup[0]!r} given twice")

    inf = _Inference(root, opt)
    inf.check_columns()
    inf.propose_keys()
    inf.column_stats()
    inf.relations()
    inf.propose_spaces()
    tasks = inf.task_lines()
    sections, skipped, n_features = inf.feature_lines()
    if n_features == 0:
        raise SpecError(f"{root}: no column is usable as a feature "
                        f"(skipped: {', '.join(c for c, _ in skipped) or 'none'})")

    lines = [*inf.header(), "", "features:"]
    titles = {"categorical": "categorical: hashed into buckets (id 0 = null)",
              "multi_hot": "multi_hot: pooled bags of hashed elements",
              "numeric": "numeric: fill -> clip -> log1p -> standardize (+ piecewise-linear bins; statistics "
                         "fitted on the training window)"}
    for kind, body in sections.items():
        if body:
            lines += [f"  # ---- {titles[kind]}", *body]
    if skipped:
        lines.append("  # ---- not features:")
        lines += [f"  #   {_clean(c)}: {_clean(why)}" for c, why in skipped]
    lines += ["", "tasks:", *tasks, ""]
    if inf.gt_cols:
        lines += ["# Hidden true values (oracle metrics only, never features).", "ground_truth:",
                  *(f"  {_scalar(k)}: {_scalar(v)}" for k, v in inf.gt_cols.items())]
    else:
        lines.append("ground_truth: {}")
    text = "\n".join(lines) + "\n"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:  # a bug here, not the user's: say so
        raise SpecError(f"produced YAML that does not parse ({e})") from None
    spec = parse_spec(raw, "init-spec output")
    return InferredSpec(text, len(spec.features), len(spec.tasks), inf.sampled, inf.total, len(inf.inp.files))


def write_spec(text: str, out: str | Path, force: bool = False) -> None:
    """Write atomically; an existing file is only replaced with force."""
    out = Path(out)
    if out.exists() and not force:
        raise SpecError(f"{out}: file exists (pass --force to overwrite)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if the file appeared meanwhile
            finally:
                os.unlink(tmp)
    except FileExistsError:
        raise SpecError(f"{out}: file exists (pass --force to overwrite)") from None
    except OSError as e:
        raise SpecError(f"{out}: cannot write the spec ({e.strerror})") from None
