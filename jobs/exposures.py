"""`mtrank exposures`: how often each item was shown on one day, for the scoring stage's traffic cap.

Every row of the impression logs is one exposure. Input: the day partition DATA/dt=DAY/ (or the root's own day layout: features/day_folders.py).
Output: one Parquet file (the item column, dt, exposures), sorted by item, written atomically. DATA and
the output may be object-store URIs (s3://...; features/storage.py).
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from mtrank.features import storage
from mtrank.features.day_folders import LAYOUT, flat_hint, no_days_hint
from mtrank.features.rules import (EMPTY_PARTITION, MISSING_COLUMN, MISSING_PARTITION, NULL, UNREADABLE, WRONG_TYPE,
                            BadInputError)
from mtrank.pipeline.output_files import check_output, write_output
from mtrank.pipeline.dataset import folder_names, list_partitions, missing_day, partition_files


@dataclass
class ExposureSummary:
    path: str
    day: str
    rows: int    # exposures read (rows of the partition)
    items: int   # distinct items, = rows of the output file

    def to_dict(self) -> dict:
        return dict(vars(self))


def _id_type(t: pa.DataType) -> pa.DataType:
    """The plain Arrow type of an id column (dictionary decoded, large/view strings as string, integers
    as int64: a writer's int32 on one file and int64 on the next are the same ids)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_integer(t) and t != pa.uint64():
        return pa.int64()
    return t


def _partition_files(data_dir: str | Path, day: dt.date,
                     item_column: str) -> tuple[str, list[str], list[pa.Schema], pa.DataType]:
    parts = list_partitions(data_dir)
    part = parts.get(day)
    if part is None:
        hint = "" if parts else f" (expected {LAYOUT}){no_days_hint(folder_names(data_dir)) or flat_hint(data_dir)}"
        raise BadInputError(missing_day(data_dir, parts, day), None, MISSING_PARTITION, f"no partition for this day{hint}")
    files = partition_files(part)
    if not files:
        raise BadInputError(str(part), None, EMPTY_PARTITION, "partition holds no Parquet files")
    item_type: pa.DataType | None = None
    schemas = []
    for f in files:
        try:
            schema = storage.read_schema(f)
            schemas.append(schema)
        except (OSError, pa.ArrowException) as e:
            raise BadInputError(f, None, UNREADABLE, f"not a readable Parquet file ({e})") from None
        if item_column not in schema.names:
            raise BadInputError(f, item_column, MISSING_COLUMN, "the item column is required to count exposures")
        t = _id_type(schema.field(item_column).type)
        if not (pa.types.is_string(t) or pa.types.is_integer(t)):
            raise BadInputError(f, item_column, WRONG_TYPE, f"expected string or integer item ids, found {t}")
        if item_type is not None and t != item_type:
            raise BadInputError(f, item_column, WRONG_TYPE, f"item ids are {t} here but {item_type} in {files[0]}")
        item_type = t
    return str(part), files, schemas, item_type


def count_exposures(data_dir: str | Path, day: dt.date, out: str | Path,
                    item_column: str = "item_id") -> ExposureSummary:
    """Count rows per item in DATA/dt=DAY and write (ITEM_COLUMN, dt, exposures) sorted by item.

    The item column keeps its name (the scoring stage's `score.item_column` reads it back: a job
    whose items are `sku` reads a `sku` column) and the logs' id type (string or int64). Raises
    BadInputError for a missing or empty partition, a file without the item column, or null item
    ids (with their count). The file appears atomically (temporary name, fsync, rename): a reader
    sees the previous file or the complete new one.
    """
    if storage.is_uri(out):
        check_output(out)   # a missing bucket fails before the logs are read
    part, files, schemas, item_type = _partition_files(data_dir, day, item_column)
    counts = (storage.scan_parquet_files(files, schemas).select(pl.col(item_column).alias("item_id"))
              .group_by("item_id").agg(pl.len().alias("exposures")).collect())   # renamed back when written
    rows = int(counts["exposures"].sum()) if counts.height else 0
    if rows == 0:
        raise BadInputError(part, None, EMPTY_PARTITION, "partition holds no rows")
    nulls = counts.filter(pl.col("item_id").is_null())
    if nulls.height:
        raise BadInputError(part, item_column, NULL, "item id missing; every exposure needs an item",
                            count=int(nulls["exposures"][0]))
    counts = counts.sort("item_id").with_columns(pl.lit(day, dtype=pl.Date).alias("dt"))
    table = pa.table({
        item_column: counts["item_id"].to_arrow().cast(item_type),
        "dt": counts["dt"].to_arrow().cast(pa.date32()),
        "exposures": counts["exposures"].to_arrow().cast(pa.int64()),
    })
    if storage.is_uri(out):   # one complete upload under the final key: atomic on an object store
        def write(f) -> None:
            pq.write_table(table, f, compression="snappy")

        write_output(out, write)
        return ExposureSummary(str(out), str(day), rows, counts.height)
    path = Path(out)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="snappy")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExposureSummary(str(path), str(day), rows, counts.height)
