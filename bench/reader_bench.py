"""Parquet -> training tensors: mtrank's reader vs pyarrow alone (the I/O ceiling) and vs the
pandas + LabelEncoder path peers use; peak RSS on 1x vs 10x rows (streaming = flat memory).

Standard workload columns (BENCHMARKS.md): 26 categorical, 2 multi-hot, 8 numeric, 5 labels.
`python -m bench.reader_bench [--quick]`; results in bench/results/reader.{json,md}.
`python -m bench.reader_bench --workers 1 2 [--quick]`: reader-thread scaling only
(bench/results/reader_workers.{json,md}).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time

import numpy as np
import pyarrow.parquet as pq

from bench.common import CACHE, machine, peak_rss_mb, repeat, run_child, write_results
from mtrank.features.featurize import Featurizer
from mtrank.features.spec import load_spec
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats, open_parquet, read_columns

START = dt.date(2026, 11, 1)


def ensure_data(rows_per_day: int, days: int) -> str:
    from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

    root = CACHE / f"std-{rows_per_day}"
    marker = root / f"_done_{days}"
    if not marker.exists():
        cfg = ImpressionConfig(seed=1, start=START, days=days, rows_per_day=rows_per_day)
        generate_impressions(root, cfg, progress=False)
        marker.touch()
    return str(root)


def _window(root: str, days: int):
    spec = load_spec()
    return spec, open_window(root, spec, START, START + dt.timedelta(days=days - 1))


def mtrank_pass(reader: ImpressionReader) -> int:
    n = 0
    for b in reader.batches():
        n += b.size
    return n


def pyarrow_pass(window, columns, dictionary: bool) -> int:
    """Read the same columns, same row groups, same chunk size; nothing else (the ceiling)."""
    n = 0
    files: dict[str, pq.ParquetFile] = {}
    for g in window.row_groups:
        if g.file not in files:
            files[g.file] = open_parquet(g.file, load_spec()) if dictionary else pq.ParquetFile(g.file)
        pf = files[g.file]
        for rb in pf.iter_batches(batch_size=65_536, row_groups=[g.index], columns=columns):
            n += rb.num_rows
    return n


def pandas_labelencoder_pass(window, spec) -> int:
    """What peers' examples do: pandas frame, LabelEncoder per sparse column, padded sequences."""
    import pandas as pd
    import torch
    from sklearn.preprocessing import LabelEncoder

    df = pd.concat([pd.read_parquet(f, columns=list(spec.required_columns)) for f in window.files])
    out = {}
    for f in spec.categorical:
        out[f.name] = torch.tensor(LabelEncoder().fit_transform(df[f.name].astype(str)))
    for f in spec.multi_hot:
        lists = df[f.name]
        lengths = lists.map(lambda x: 0 if x is None else len(x)).to_numpy()
        flat = lists.explode().dropna().astype(str)
        codes = LabelEncoder().fit_transform(flat) + 1
        pad = np.zeros((len(df), max(int(lengths.max()), 1)), np.int64)
        rows = np.repeat(np.arange(len(df)), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pad[rows, cols] = codes
        out[f.name] = torch.tensor(pad)
    dense = df[[f.name for f in spec.dense]].fillna(0.0).to_numpy(np.float32)
    out["dense"] = torch.tensor((dense - dense.mean(0)) / (dense.std(0) + 1e-9))
    for t in spec.tasks:
        out[t.name] = torch.tensor(df[t.label].to_numpy(np.float32))
    return len(df)


def child(root: str, days: int, stats_json: str, workers: int = 1) -> None:
    """One pass in a fresh process: peak RSS of streaming a window of `days` days."""
    from mtrank.features.numeric import NumericStats

    spec, window = _window(root, days)
    base = peak_rss_mb()
    reader = ImpressionReader(window, spec, Featurizer(spec, NumericStats.from_json(stats_json)),
                              batch_size=4096, shuffle=True, progress=False, workers=workers)
    t0 = time.perf_counter()
    n = mtrank_pass(reader)
    print(json.dumps({"rows": n, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                      "rss_before_mb": base}))


def workers_scaling(rows: int, reps: int, workers: list[int]) -> None:
    """Featurized rows/s of one shuffled pass with 1, 2, ... reader threads, interleaved repetitions
    (the data path alone: what epoch 1 costs before the feature cache holds the rows)."""
    import os
    import statistics

    root = ensure_data(rows, 10)
    spec, window = _window(root, 1)
    feat = Featurizer(spec, fit_numeric_stats(ImpressionReader(window, spec, progress=False)))
    rates: dict[int, list[float]] = {w: [] for w in workers}
    loads = []
    mtrank_pass(ImpressionReader(window, spec, feat, batch_size=4096, progress=False))   # warm the page cache
    for _ in range(reps):
        for w in workers:
            t0 = time.perf_counter()
            n = mtrank_pass(ImpressionReader(window, spec, feat, batch_size=4096, shuffle=True, progress=False,
                                             workers=w))
            rates[w].append(n / (time.perf_counter() - t0))
            loads.append(os.getloadavg()[0])
    stats = {w: {"median": statistics.median(r), "min": min(r), "max": max(r)} for w, r in rates.items()}
    base = stats[workers[0]]["median"]
    # memory in the data size: a fresh process streams 1 and 10 days with each thread count
    rss = {w: {d: run_child("bench.reader_bench", "--child", root, str(d), feat.stats.to_json(), "--child-workers",
                            str(w)) for d in (1, 10)} for w in workers}
    md = [f"## Reader threads: Parquet -> validated, hashed, shuffled Batch ({rows:,} rows)", "",
          f"machine: {os.cpu_count()} cores; median (min-max) of {reps} interleaved repetitions; 1-min load "
          f"average {min(loads):.2f}-{max(loads):.2f}", "",
          "| data_workers | rows/s | vs 1 worker |", "|---|---|---|"]
    for w, st in stats.items():
        md.append(f"| {w} | {st['median']:,.0f} ({st['min']:,.0f}-{st['max']:,.0f}) | {st['median'] / base:.2f}x |")
    md += ["", "| data_workers | peak RSS MB, 1 day | peak RSS MB, 10 days | 10 days / 1 day |", "|---|---|---|---|"]
    for w, r in rss.items():
        md.append(f"| {w} | {r[1]['peak_rss_mb']:.0f} ({r[1]['rows']:,} rows) | {r[10]['peak_rss_mb']:.0f} "
                  f"({r[10]['rows']:,} rows) | {r[10]['peak_rss_mb'] / r[1]['peak_rss_mb']:.2f} |")
    write_results("reader_workers", {"machine": machine(), "rows": rows, "rows_per_s": stats,
                                     "peak_rss": rss, "loads": loads}, "\n".join(md) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200k rows instead of 1M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "DAYS", "STATS"))
    ap.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, nargs="*", default=None,
                    help="only the reader-thread scaling, for these data_workers counts (e.g. 1 2)")
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), a.child[2], a.child_workers)
    if a.workers:
        return workers_scaling(200_000 if a.quick else 1_000_000, a.reps, a.workers)

    rows = 200_000 if a.quick else 1_000_000
    t0 = time.perf_counter()
    root = ensure_data(rows, 10)
    gen_s = time.perf_counter() - t0
    spec, window = _window(root, 1)
    cols = read_columns(spec, window.schema, with_eval=False)  # exactly what a training pass reads
    t0 = time.perf_counter()
    stats = fit_numeric_stats(ImpressionReader(window, spec, progress=False))
    stats_s = time.perf_counter() - t0
    feat = Featurizer(spec, stats)

    arrow_plain = repeat("pyarrow alone, same columns (default read)", rows,
                         lambda: pyarrow_pass(window, cols, False), a.reps)
    arrow = repeat("pyarrow alone, same columns, strings as dictionaries (ceiling)", rows,
                   lambda: pyarrow_pass(window, cols, True), a.reps)
    plain = repeat("mtrank reader -> Batch", rows, lambda: mtrank_pass(
        ImpressionReader(window, spec, feat, batch_size=4096, progress=False)), a.reps)
    shuf = repeat("mtrank reader -> Batch, shuffled (64k-row buffer)", rows, lambda: mtrank_pass(
        ImpressionReader(window, spec, feat, batch_size=4096, shuffle=True, progress=False)), a.reps)
    shuf_big = repeat("mtrank reader -> Batch, shuffled (256k-row buffer)", rows, lambda: mtrank_pass(
        ImpressionReader(window, spec, feat, batch_size=4096, shuffle=True, shuffle_buffer=262_144,
                         progress=False)), a.reps)
    pandas = repeat("pandas + LabelEncoder (peers)", rows, lambda: pandas_labelencoder_pass(window, spec),
                    a.reps, warmup=False)
    one = run_child("bench.reader_bench", "--child", root, "1", stats.to_json())
    ten = run_child("bench.reader_bench", "--child", root, "10", stats.to_json())

    m = machine()
    res = {"machine": m, "rows": rows, "generate_seconds_10_days": gen_s, "stats_pass_seconds": stats_s,
           "rows_per_s": {t.name: {"median": t.median, "min": min(t.rates), "max": max(t.rates)}
                          for t in (arrow_plain, arrow, plain, shuf, shuf_big, pandas)},
           "ratio_vs_pyarrow": plain.median / arrow.median, "ratio_shuffled_vs_pyarrow": shuf.median / arrow.median,
           "ratio_vs_pandas": plain.median / pandas.median,
           "rss_1x": one, "rss_10x": ten, "rss_ratio_10x_vs_1x": ten["peak_rss_mb"] / one["peak_rss_mb"]}
    md = [f"## Parquet -> training tensors ({rows:,} rows, standard workload columns)", "",
          f"machine: {m['cores']} cores, load average {m['loadavg']}; median of {a.reps} (min-max)", "",
          "| path | rows/s | vs pyarrow ceiling |", "|---|---|---|"]
    for t in (arrow_plain, arrow, plain, shuf, shuf_big, pandas):
        md.append(f"| {t.name} | {t.cell()} | {t.median / arrow.median:.0%} |")
    md += ["", f"mtrank vs pandas+LabelEncoder: **{plain.median / pandas.median:.1f}x**; "
               f"stats pass (fit standardisation): {rows / stats_s:,.0f} rows/s", "",
           f"columns read: {len(cols)} (26 categorical, 2 multi-hot, 8 numeric, 5 labels)", "",
           "| streaming pass (shuffled, fresh process) | rows | peak RSS MB | rows/s |", "|---|---|---|---|",
           f"| 1x | {one['rows']:,} | {one['peak_rss_mb']:.0f} | {one['rows'] / one['seconds']:,.0f} |",
           f"| 10x | {ten['rows']:,} | {ten['peak_rss_mb']:.0f} | {ten['rows'] / ten['seconds']:,.0f} |",
           "", f"peak RSS 10x / 1x: **{res['rss_ratio_10x_vs_1x']:.2f}**", ""]
    write_results("reader", res, "\n".join(md))


if __name__ == "__main__":
    main()
