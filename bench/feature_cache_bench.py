"""Featurize once: throughput of the epochs after the first, with and without the feature cache,
against the compute reference measured in the same run (issue 16 point 4, BENCHMARKS.md).

Standard workload (1M training rows of day 1, MMoE + ESMM, fp32). Each mtrank run trains
`--epochs` epochs with data loading inside every timed epoch; the figures are the samples/s of
epoch 1 and the median over epochs >= 2 of each run, median (min-max) over interleaved repetitions
(reference, cache off, cache memory, cache disk, reference, ...). Target: epochs >= 2 at >= 90 % of the
compute reference's samples/s.

    .venv/bin/python -m bench.feature_cache_bench [--reps 3] [--epochs 3] [--rows 1000000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

from bench.common import CACHE, machine, write_results
from bench.mtrank_run import ensure_data
from bench.train_bench import fmt_rate, run

MODES = ("off", "memory", "disk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--quick", action="store_true", help="200k rows, 2 epochs, 2 repetitions")
    a = ap.parse_args()
    if a.quick:
        a.rows, a.epochs, a.reps = 200_000, 2, 2
    ensure_data()
    ref, runs, loads = [], {m: [] for m in a.modes}, []
    for rep in range(a.reps):
        r = run(sys.executable, "bench.peers.reference", ["--rows", str(a.rows)])
        ref.append(r["samples_per_s"])
        loads.append(os.getloadavg()[0])
        print(f"rep {rep + 1}: reference {r['samples_per_s']:,.0f}/s", flush=True)
        for mode in a.modes:
            shutil.rmtree(CACHE / "feature-cache", ignore_errors=True)   # disk: written by this run's epoch 1
            args = ["--rows", str(a.rows), "--eval-rows", "20000", "--epochs", str(a.epochs),
                    "--feature-cache", "memory" if mode == "memory" else mode]
            if mode == "disk":
                args += ["--feature-cache-mb", "1"]
            res = run(sys.executable, "bench.mtrank_run", args)
            runs[mode].append(res)
            loads.append(os.getloadavg()[0])
            print(f"rep {rep + 1}: cache {mode}: epochs {res['epoch_samples_per_s']}, peak RSS "
                  f"{res['peak_rss_mb']:,.0f} MB", flush=True)
    ref_med = statistics.median(ref)
    md = ["## Featurize once: epochs after the first (standard workload, fp32)\n",
          f"machine: {machine()}; {a.rows:,} training rows, {a.epochs} epochs per run; median (min-max) of "
          f"{a.reps} interleaved repetitions; 1-min load average {min(loads):.2f}-{max(loads):.2f}\n",
          "| feature cache | epoch 1 samples/s | epochs ≥ 2 samples/s | epochs ≥ 2 vs compute reference | "
          "peak RSS MB |", "|---|---|---|---|---|",
          f"| compute reference (no data path) | | {fmt_rate(ref)} | 1.00x | |"]
    for mode, rs in runs.items():
        first = [r["epoch_samples_per_s"][0] for r in rs]
        later = [statistics.median(r["epoch_samples_per_s"][1:]) for r in rs]
        md.append(f"| {mode} | {fmt_rate(first)} | {fmt_rate(later)} | {statistics.median(later) / ref_med:.2f}x | "
                  f"{max(r['peak_rss_mb'] for r in rs):,.0f} |")
    write_results("feature_cache", {"machine": machine(), "rows": a.rows, "epochs": a.epochs, "reference": ref,
                                    "runs": runs, "loads": loads}, "\n".join(md) + "\n")



if __name__ == "__main__":
    main()
