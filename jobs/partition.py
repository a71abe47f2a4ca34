"""`mtrank partition`: a flat export (one Parquet file, or a folder of them) laid out as day folders.

Training, validation and exposures read one folder per day. A log exported as one table (a data
set's single file, a warehouse query's result) carries its day only in a time column; this writes
OUT/dt=YYYY-MM-DD/part-00000.parquet per day, every column kept. The day is the time column's own
date: a timestamp's date in its time zone (naive: as written) or in `--timezone`, a date as is, an
integer as epoch time in `--unit`. A row without a time cannot be placed: the job fails counting them
before anything is written. Rows written = rows read. Each day is read from the input by a filtered
scan (memory: one day at a time; the input is read once per day, and an export sorted by time lets
each scan skip the other days' row groups by their statistics), written atomically as one file of
full-size row groups; days already under OUT are refused, so a rerun cannot mix two exports.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mtrank.features import storage
from mtrank.features.day_folders import find_day
from mtrank.features.infer_spec import find_files
from mtrank.features.rules import MISSING_COLUMN, NULL, WRONG_TYPE, BadInputError
from mtrank.pipeline.output_files import check_output, write_output
from mtrank.pipeline.progress import Progress

UNITS = ("s", "ms", "us", "ns")


@dataclass
class PartitionSummary:
    out: str
    rows: int
    days: dict[str, int]     # day -> rows written

    def line(self) -> str:
        first, last = min(self.days), max(self.days)
        return (f"wrote {self.rows:,} rows in {len(self.days)} day folder(s) dt={first} .. dt={last} under "
                f"{self.out} (rows read {self.rows:,} = rows written)")


def _day_expr(column: str, dtype: pl.DataType, where: str, timezone: str | None, unit: str | None) -> pl.Expr:
    """The expression giving each row's day, or a one-line error for a column that holds no time."""
    col = pl.col(column)
    if dtype.is_integer():
        if unit is None:
            raise BadInputError(where, column, WRONG_TYPE, f"integers: give their epoch unit (--unit, one of "
                                f"{', '.join(UNITS)})")
        col = pl.from_epoch(col, time_unit=unit)
        dtype = pl.Datetime()   # naive: the epoch is UTC
    elif unit is not None:
        raise BadInputError(where, column, WRONG_TYPE, f"--unit is for integer epoch times; this column is {dtype}")
    if dtype == pl.Date:
        if timezone:
            raise BadInputError(where, column, WRONG_TYPE, "dates have no time zone to convert (--timezone)")
        return col
    if not isinstance(dtype, pl.Datetime):
        raise BadInputError(where, column, WRONG_TYPE, f"expected a timestamp, a date or integer epoch times, "
                            f"found {dtype}; cast it in the export")
    if timezone:
        if dtype.time_zone is None:   # naive times are taken as UTC before the conversion
            col = col.dt.replace_time_zone("UTC")
        try:
            col = col.dt.convert_time_zone(timezone)
        except pl.exceptions.PolarsError as e:
            raise BadInputError(where, column, WRONG_TYPE, f"--timezone: {str(e).splitlines()[0]}") from None
    return col.dt.date()


def partition(data: str | Path, time_column: str, out: str | Path, *, timezone: str | None = None,
              unit: str | None = None, progress: bool | None = None) -> PartitionSummary:
    inp = find_files(data)
    where = str(data)
    scan = storage.scan_parquet_files(inp.files)
    schema = scan.collect_schema()
    if time_column not in schema:
        raise BadInputError(inp.files[0], time_column, MISSING_COLUMN, "the time column to partition by is not "
                            f"there (columns: {', '.join(schema.names()[:12])}{' …' if len(schema) > 12 else ''})")
    day = _day_expr(time_column, schema[time_column], where, timezone, unit)
    try:
        counts = scan.select(day.alias("day")).group_by("day").len().collect()
    except pl.exceptions.PolarsError as e:   # e.g. an unknown time zone
        raise BadInputError(where, time_column, WRONG_TYPE, str(e).splitlines()[0]) from None
    nulls = counts.filter(pl.col("day").is_null())
    if nulls.height:
        raise BadInputError(where, time_column, NULL, "rows without a time cannot be placed in a day; fill or "
                            "drop them in the export", count=int(nulls["len"][0]))
    days = {d: int(n) for d, n in sorted(zip(counts["day"].to_list(), counts["len"].to_list()))}
    if not days:
        raise BadInputError(where, None, "no_rows", "the input holds no rows")
    out = str(out).rstrip("/") if storage.is_uri(out) else Path(out)
    taken = [d for d in days if find_day(out, d)] if storage.is_uri(out) or Path(out).is_dir() else []
    if taken:
        raise BadInputError(str(out), None, "day_exists", f"already holds a folder for {taken[0]} ({len(taken)} of "
                            f"the {len(days)} days): partition into a root of its own")
    check_output(storage.join(out, "x") if storage.is_uri(out) else Path(out) / "x")
    written: dict[str, int] = {}
    with Progress("partition", total=len(days), unit="days", enabled=progress) as bar:
        for d, n in days.items():
            frame = scan.filter(day == d).collect()
            if frame.height != n:   # the input changed while it was read
                raise BadInputError(where, time_column, "changed_input", f"{d}: {frame.height:,} rows now, "
                                    f"{n:,} when counted")
            target = storage.join(out, f"dt={d:%Y-%m-%d}", "part-00000.parquet") if storage.is_uri(out) \
                else Path(out) / f"dt={d:%Y-%m-%d}" / "part-00000.parquet"
            check_output(target)   # the day's folder (local), the bucket (remote)
            write_output(target, lambda f, frame=frame: frame.write_parquet(f, compression="zstd"))
            written[f"{d:%Y-%m-%d}"] = n
            bar.update(1, day=str(d))
    return PartitionSummary(str(out), sum(written.values()), written)

