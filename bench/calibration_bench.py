"""Calibration on the demo workload: PCOC per task on the evaluation day, without and with Platt
scaling fitted on the newest training day (issue 16 point 5; target |PCOC - 1| <= 0.05 per task).

The demo's logs (`make train`'s generator settings: 8 days x 50k rows) and the demo job, once as
shipped and once with `validation_days: 1, calibration: platt`, for several training seeds. The
figures come from each run's metrics.json: `pcoc` (as saved, i.e. calibrated when calibration is on)
and `pcoc_uncalibrated` (the same model before its Platt layer), logloss and AUC.

    .venv/bin/python -m bench.calibration_bench [--seeds 3] [--epochs 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from bench.common import CACHE, machine, write_results

ROOT = Path(__file__).resolve().parents[1]
LOGS = CACHE / "demo-logs"
DATE = "2026-11-08"
MTRANK = [sys.executable, "-m", "mtrank.jobs.cli"]


def ensure_logs() -> None:
    if (LOGS / f"dt={DATE}").exists():
        return
    subprocess.run([*MTRANK, "generate", "--out", str(LOGS), "--days", "8", "--rows-per-day", "50000", "--seed", "7",
                    "--users", "200000", "--items", "100000"], check=True)


def run(variant: str, seed: int, epochs: int) -> dict:
    base = CACHE / "calibration" / f"{variant.replace(' ', '').replace(',', '-').replace('%', '')}-s{seed}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    job = yaml.safe_load((ROOT / "jobs" / "default_job.yaml").read_text())
    job.pop("score", None), job.pop("promote", None), job.pop("warm_start", None)
    job |= {"name": "calib", "data": str(LOGS.resolve()), "work_dir": str((base / "work").resolve())}
    job["train"] |= {"seed": seed, "epochs": epochs, "checkpoint_every": 0}
    if variant == "platt, last day":
        job["train"] |= {"validation_days": 1, "calibration": "platt"}
    elif variant == "platt, 10% of requests":
        job["train"] |= {"validation_fraction": 0.1, "calibration": "platt"}
    (base / "job.yaml").write_text(yaml.safe_dump(job))
    r = subprocess.run([*MTRANK, "train", "--config", str(base / "job.yaml"), "--date", DATE, "--no-track"],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"train failed ({variant}, seed {seed}):\n{r.stderr[-3000:]}")
    m = json.loads((base / "work" / "runs" / job["name"] / DATE / "metrics.json").read_text())
    return {fig: {k: v[k] for k in ("pcoc", "pcoc_uncalibrated", "logloss", "logloss_uncalibrated", "auc")
                  if v.get(k) is not None} for fig, v in m["tasks"].items() if "pcoc" in v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one seed")
    a = ap.parse_args()
    if a.quick:
        a.seeds = 1
    ensure_logs()
    runs: dict[str, list[dict]] = {"none": [], "platt, last day": [], "platt, 10% of requests": []}
    loads = []
    for seed in range(a.seeds):
        for variant in runs:
            runs[variant].append(run(variant, seed, a.epochs))
            loads.append(os.getloadavg()[0])
            print(f"seed {seed} {variant}: " + ", ".join(f"{f} {v['pcoc']:.3f}" for f, v in runs[variant][-1].items()),
                  flush=True)

    def cell(variant: str, fig: str, key: str) -> str:
        vals = [r[fig][key] for r in runs[variant] if key in r.get(fig, {})]
        return f"{statistics.median(vals):.3f} ({min(vals):.3f}–{max(vals):.3f})" if vals else ""

    figs = list(runs["none"][0])
    variants = [v for v in runs if v != "none"]
    md = ["## Calibration on the demo workload (PCOC on the evaluation day)\n",
          f"machine: {machine()}; demo logs (8 days x 50k rows, seed 7), demo job (7-day window), {a.epochs} "
          f"epoch(s); median (min–max) over training seeds 0..{a.seeds - 1}; load average "
          f"{min(loads):.2f}–{max(loads):.2f}. `last day`: validation_days 1 (trains on 6 days); `10% of "
          "requests`: validation_fraction 0.1 (trains on 90 % of the requests of all 7 days)\n",
          "| figure | PCOC, no calibration | " + " | ".join(f"PCOC before / after Platt ({v[7:]})" for v in variants)
          + " | AUC, no calibration |", "|---|---|" + "---|" * len(variants) + "---|"]
    for f in figs:
        md.append(f"| {f} | {cell('none', f, 'pcoc')} | " + " | ".join(
            f"{cell(v, f, 'pcoc_uncalibrated')} → **{cell(v, f, 'pcoc')}**" for v in variants)
            + f" | {cell('none', f, 'auc')} |")
    for v in variants:
        worst = max(abs(statistics.median(r[f]["pcoc"] for r in runs[v]) - 1) for f in figs)
        md.append(f"\nLargest |median PCOC − 1| after Platt ({v[7:]}): {worst:.3f} (target ≤ 0.05).")
    write_results("calibration", {"machine": machine(), "runs": runs, "loads": loads}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
