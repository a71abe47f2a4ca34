"""`mtrank validate`: schema, row rules, accounting and hash collisions for a window of logs."""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import polars as pl

from mtrank.features import storage
from mtrank.features.admission import IdCounts, format_summary
from mtrank.features.hashing import table_collisions
from mtrank.features.spec import FeatureSpec
from mtrank.pipeline.output_files import check_output, write_output
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.reader import ImpressionReader, skipped_files

log = logging.getLogger("mtrank")


def validate(data: str | Path, spec: FeatureSpec, start: dt.date | None = None, end: dt.date | None = None,
             quarantine_dir: str | Path | None = None, collisions: bool = True,
             progress: bool | None = None, on_unreadable: str = "fail") -> dict:
    """Read every row once with the training reader's rules; raises BadInputError in fail mode.
    `on_unreadable="skip"`: corrupt or truncated files are skipped and listed (`skipped_files`)."""
    window = open_window(data, spec, start, end, on_unreadable=on_unreadable)
    reader = ImpressionReader(window, spec, quarantine_dir=quarantine_dir, progress=progress)
    for _ in reader.frames():
        pass
    skipped = skipped_files(window, reader.accounting)
    report = {"window": window.describe(), "accounting": reader.accounting.as_dict(),
              "skipped_files": skipped, "spec_fingerprint": spec.fingerprint()}
    readable = [f for f in window.files if f not in {u["file"] for u in skipped}]
    if readable:   # exact copies of an earlier row (a logging retry, a double write): counted, kept
        lf = storage.scan_parquet_files(readable, [window.file_schemas[f] for f in readable])
        report["duplicate_rows"] = int(lf.select(pl.len() - pl.struct(pl.all()).n_unique()).collect().item())
        report["duplicate_rows_policy"] = spec.duplicate_rows
    if collisions and readable:
        lf = storage.scan_parquet_files(readable, [window.file_schemas[f] for f in readable])
        report["collisions"] = {k: v.as_dict() for k, v in table_collisions(lf, spec).items()}
        # lookups per hashed id: how many ids (rows of the table) and lookups fall under each table's
        # min_count (frequency admission: they would share the rare row); every row read, as collisions
        report["id_counts"] = IdCounts.of_frame(lf, spec).summary(spec)
    return report


def format_report(report: dict) -> str:
    acc, win = report["accounting"], report["window"]
    lines = [f"window {win['start'] or '*'} .. {win['end'] or '*'}: {win['files']} files, "
             f"{win['row_groups']} row groups",
             f"rows read {acc['rows_read']:,} = accepted {acc['rows_accepted']:,} + rejected {acc['rows_rejected']:,}"
             f"  ({'balanced' if acc['balanced'] else 'NOT BALANCED'})"]
    for reason, n in acc["rejected_by_reason"].items():
        lines.append(f"  rejected {n:>10,}  {reason}")
    for u in report.get("skipped_files", []):
        where = f" row group {u['row_group']}" if u["row_group"] is not None else ""
        rows = f", {u['rows']:,} rows not read" if u["rows"] is not None else ""
        lines.append(f"SKIPPED unreadable file {u['file']}{where}{rows}: {u['error']}")
    if "duplicate_rows" in report:
        how = ("rejected: duplicate_rows: reject" if report.get("duplicate_rows_policy") == "reject"
               else "kept; the spec's duplicate_rows: reject drops them")
        lines.append(f"exact duplicate rows (copies of an earlier row; {how}): {report['duplicate_rows']:,}")
    if win["empty_partitions"]:
        lines.append(f"empty partitions (allowed): {', '.join(win['empty_partitions'])}")
    if "collisions" in report:
        lines.append(f"{'table':<24}{'buckets':>10}{'values':>10}{'ids':>10}{'collide':>9}")
        for c in report["collisions"].values():
            lines.append(f"{c['table']:<24}{c['buckets']:>10,}{c['distinct_values']:>10,}"
                         f"{c['distinct_ids']:>10,}{c['collision_rate']:>8.2%}")
    if report.get("id_counts"):
        lines.append("ids per table under min_count (they share the table's rare row; min_count 1 = off):")
        lines += format_summary(report["id_counts"])
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    """Atomically, to a local path or an object-store URI."""
    check_output(path)
    write_output(path, json.dumps(report, indent=2, sort_keys=True).encode())
