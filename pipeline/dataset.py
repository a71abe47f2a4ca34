"""Finding the Parquet to read: day partitions, their files and row groups, and each rank's share.

Layout: ROOT/dt=YYYY-MM-DD/*.parquet, or any one key and date style of day folders (`ds=YYYYMMDD`,
sub-partitions inside a day; features/day_folders.py). Only day folders and files that resolve inside
ROOT are read (a partition name or symlink cannot point the reader elsewhere). The unit of work is a
row group: small enough to balance ranks, large enough to read efficiently.

ROOT may be an object-store URI (`s3://bucket/logs`, see features/storage.py): the same listing,
checks and messages, with files named by their URIs. A window is identified (training fingerprint,
`describe()`) by its root as given, dates and file / row-group / row counts, for local and remote
roots alike; no content hash of the files is taken on either.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from mtrank.features import day_folders, storage
from mtrank.features.rules import EMPTY_PARTITION, MISSING_PARTITION, UNREADABLE, BadInputError, check_schema
from mtrank.features.spec import FeatureSpec

log = logging.getLogger("mtrank.data")
SKIP_HINT = "on_unreadable_file: skip (job config; validate --on-unreadable-file skip) goes on without it"


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    rows: int
    date: dt.date


@dataclass
class DataWindow:
    """The row groups of a date range, with what was found empty (when that is allowed)."""

    root: str
    start: dt.date | None
    end: dt.date | None
    row_groups: list[RowGroup]
    files: list[str]
    empty_partitions: list[str]
    schema: pa.Schema | None  # of the first file; every file is checked against the spec
    on_unreadable: str = "fail"  # "skip": unreadable files / row groups are skipped, counted, reported
    unreadable: list[dict] = field(default_factory=list)  # files skipped here: footer unreadable
    file_schemas: dict[str, pa.Schema] = field(default_factory=dict)  # of every file in `files`, as read here

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.row_groups)

    def shard(self, rank: int, world_size: int) -> list[RowGroup]:
        """Row groups of one rank: disjoint across ranks, together exactly the window."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        return self.row_groups[rank::world_size]

    def describe(self) -> dict:
        return {"root": self.root, "start": str(self.start) if self.start else None,
                "end": str(self.end) if self.end else None, "files": len(self.files),
                "row_groups": len(self.row_groups), "rows": self.rows,
                "empty_partitions": self.empty_partitions,
                **({"unreadable_files": self.unreadable} if self.unreadable else {})}


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _remote_partitions(root: str) -> dict[dt.date, str]:
    """The day partitions under an object-store prefix (URIs); a prefix without objects does not exist."""
    try:
        if storage.kind(root) != "dir":
            raise BadInputError(root, None, MISSING_PARTITION, "data directory does not exist")
        entries = storage.list_dir(root)
    except OSError as e:
        raise BadInputError(root, None, UNREADABLE, f"cannot list the data directory ({storage.one_line(e)})") from None
    return day_folders.day_map(root, [(storage.name(uri), uri) for uri, is_dir in entries if is_dir])


def partition_files(part: str | Path) -> list[str]:
    """The Parquet files of one day partition (sub-partitions included), in path order."""
    return day_folders.files_under(part)


def folder_names(root: str | Path) -> list[str]:
    """Names of the folders directly under `root` (for an error's hint; empty when unlistable)."""
    try:
        if storage.is_uri(root):
            return [storage.name(u) for u, is_dir in storage.list_dir(str(root).rstrip("/")) if is_dir]
        return [p.name for p in Path(root).iterdir() if p.is_dir()]
    except OSError:
        return []


def missing_day(root: str | Path, parts: dict, day: dt.date) -> str:
    """Where `day`'s folder would be, in the root's own naming (for a missing-day message)."""
    like = [storage.name(p) for p in parts.values()]
    return f"{str(root).rstrip('/')}/{day_folders.name_of(day, like)}"


def list_partitions(root: str | Path) -> dict[dt.date, Path | str]:
    """date -> partition folder (a Path, or a URI for an object-store root)."""
    if storage.is_uri(root):
        return _remote_partitions(str(root).rstrip("/"))
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(str(root), None, MISSING_PARTITION, "data directory does not exist")
    base = root.resolve()
    out = day_folders.day_map(str(root), [(p.name, p) for p in sorted(root.iterdir()) if p.is_dir()])
    for p in out.values():
        if not _inside(p, base):
            raise BadInputError(str(p), None, UNREADABLE, "partition resolves outside the data root")
    return out


def open_window(root: str | Path, spec: FeatureSpec, start: dt.date | None = None,
                end: dt.date | None = None, on_unreadable: str = "fail") -> DataWindow:
    """Every row group of the days in [start, end] (all days when unset); schemas checked.

    A file whose footer cannot be read fails naming it, or with `on_unreadable="skip"` is left out,
    logged and listed in `unreadable` (a file whose pages turn out corrupt is handled by the reader)."""
    if on_unreadable not in ("fail", "skip"):
        raise ValueError(f"on_unreadable must be 'fail' or 'skip', not {on_unreadable!r}")
    parts = list_partitions(root)
    days = sorted(d for d in parts if (start is None or d >= start) and (end is None or d <= end))
    empty: list[str] = []
    if start is not None and end is not None:
        want = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
        for d in want:
            if d not in parts:
                if not spec.allow_empty_partitions:
                    raise BadInputError(missing_day(root, parts, d), None, MISSING_PARTITION,
                                        "no partition for this day in the requested window "
                                        "(set allow_empty_partitions: true to train without it)")
                empty.append(storage.name(missing_day(root, parts, d)))
    if not days and not empty:
        hint = "" if parts else day_folders.no_days_hint(folder_names(root)) or day_folders.flat_hint(root)
        raise BadInputError(str(root), None, MISSING_PARTITION,
                            f"no day partitions ({day_folders.LAYOUT}) between {start or '-inf'} and "
                            f"{end or '+inf'}{hint}")
    remote = storage.is_uri(root)
    if remote:
        root = str(root).rstrip("/")
    base = None if remote else Path(root).resolve()
    groups: list[RowGroup] = []
    files: list[str] = []
    schema: pa.Schema | None = None
    schemas: dict[str, pa.Schema] = {}
    unreadable: list[dict] = []
    for d in days:
        part = parts[d]
        part_rows, part_skipped = 0, 0
        for f in partition_files(part):
            if base is not None and not _inside(Path(f), base):
                raise BadInputError(str(f), None, UNREADABLE, "file resolves outside the data root")
            try:
                meta = storage.parquet_file(f).metadata
                file_schema = meta.schema.to_arrow_schema()
            except (OSError, pa.ArrowException) as e:
                if on_unreadable != "skip":
                    raise BadInputError(str(f), None, UNREADABLE,
                                        f"not a readable Parquet file ({e}); {SKIP_HINT}") from None
                log.warning("skipping %s: rule %s: not a readable Parquet file (%s)", f, UNREADABLE, e)
                unreadable.append({"file": str(f), "row_group": None, "rows": None,
                                   "error": f"not a readable Parquet file ({e})"})
                part_skipped += 1
                continue
            check_schema(file_schema, spec, str(f))
            schema = schema or file_schema
            files.append(str(f))
            schemas[str(f)] = file_schema
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                part_rows += n
                if n:
                    groups.append(RowGroup(str(f), i, n, d))
        if part_rows == 0:
            if not spec.allow_empty_partitions:
                why = f" readable ({part_skipped} unreadable file(s) skipped)" if part_skipped else ""
                raise BadInputError(str(part), None, EMPTY_PARTITION,
                                    f"partition holds no{why} rows (set allow_empty_partitions: true to allow)")
            empty.append(storage.name(part))
    return DataWindow(str(root), start, end, groups, files, sorted(empty), schema, on_unreadable, unreadable, schemas)


def check_labels(window: DataWindow, spec: FeatureSpec, min_rows: int) -> dict[str, dict[str, int]]:
    """One columnar pass over the window's label columns before any training: too few rows, or a
    binary task without positives or without negatives in its population, is an error naming the
    task (a model of it would be a constant). Returns {task: {rows, positives}}."""
    import polars as pl

    where = f"{window.root} [{window.start or '*'} .. {window.end or '*'}]"
    if not window.files:
        raise BadInputError(where, None, "no_rows", "the training window holds no Parquet files")
    binary = [t for t in spec.tasks if t.type == "binary"]
    labels = list(dict.fromkeys(t.label for t in binary))
    exprs = [pl.len().alias("__rows")]
    for t in binary:
        pop = pl.lit(True) if t.space == "all" else pl.col(spec.space_label(t)).fill_null(0) > 0
        exprs += [pop.sum().alias(f"{t.name}/rows"), (pop & (pl.col(t.label).fill_null(0) > 0)).sum().alias(f"{t.name}/pos")]
    cols = list(dict.fromkeys([*labels, *(spec.space_label(t) for t in binary if t.space != "all")]))

    def scan(files: list[str]) -> dict:
        return storage.scan_parquet_files(files, [window.file_schemas[f] for f in files]).select(cols) \
            .select(exprs).collect().row(0, named=True)

    try:
        got = scan(window.files)
    except (pl.exceptions.PolarsError, OSError):   # a broken file: the reader reports or skips it; sum the rest
        parts = []
        for f in window.files:
            try:
                parts.append(scan([f]))
            except (pl.exceptions.PolarsError, OSError):
                continue
        got = {k: sum(p[k] for p in parts) for k in (parts[0] if parts else {"__rows": 0})}
    if got["__rows"] < min_rows:
        raise BadInputError(where, None, "too_few_rows", f"{got['__rows']:,} rows to train on, fewer than "
                            f"train.min_rows {min_rows:,}", count=got["__rows"])
    out = {}
    for t in binary:
        rows, pos = int(got[f"{t.name}/rows"]), int(got[f"{t.name}/pos"])
        if pos == 0 or pos == rows:
            what = "no positive" if pos == 0 else "no negative"
            raise BadInputError(where, t.label, "one_class", f"task {t.name!r} has {what} label among its "
                                f"{rows:,} training rows ({'all rows' if t.space == 'all' else t.space + ' positives'}); "
                                "a model of it would be a constant: widen the window or remove the task")
        out[t.name] = {"rows": rows, "positives": pos}
    return out
