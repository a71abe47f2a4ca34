"""Calibration: PCOC per task on the evaluation day, without and with Platt scaling fitted on held-out
rows of the training window (issue 16 point 5; target |PCOC - 1| <= 0.05 per task).

The demo's logs (`make train`'s generator settings: 8 days x 50k rows) with the demo job, and real
data (`--real movielens,adult`: bench/real_bench.py's time splits and specs), each trained per seed
as shipped and with `calibration: platt` fitted on the newest day or on 10 % of the requests, with
the default prior (`calibration_prior_sd` 0.1) and without one (plain maximum likelihood). The
figures come from each run's metrics.json: `pcoc` (as saved, i.e. calibrated when calibration is on)
and `pcoc_uncalibrated` (the same model before its Platt layer), logloss and AUC.

    .venv/bin/python -m bench.calibration_bench [--seeds 3] [--first-seed 0] [--epochs 1] [--real movielens,adult] [--no-demo]
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
DATE = "2026-11-08"
ROWS = 50_000          # a day of `make train`'s logs; --rows-per-day scales the eval day's positives


MTRANK = [sys.executable, "-m", "mtrank.jobs.cli"]


def logs_dir(rows: int) -> Path:
    return CACHE / ("demo-logs" if rows == ROWS else f"demo-logs-{rows}")


def ensure_logs(rows: int) -> Path:
    logs = logs_dir(rows)
    if not (logs / f"dt={DATE}").exists():
        subprocess.run([*MTRANK, "generate", "--out", str(logs), "--days", "8", "--rows-per-day", str(rows), "--seed",
                        "7", "--users", "200000", "--items", "100000"], check=True)
    return logs


VARIANTS = {
    "none": {},
    "platt, last day": {"validation_days": 1, "calibration": "platt"},
    "platt, 10% of requests": {"validation_fraction": 0.1, "calibration": "platt"},
    "platt without prior, 10% of requests": {"validation_fraction": 0.1, "calibration": "platt",
                                             "calibration_prior_sd": None},
}


def _figures(m: dict) -> dict:
    return {fig: {k: v[k] for k in ("pcoc", "pcoc_lo", "pcoc_hi", "pcoc_uncalibrated", "logloss",
                                    "logloss_uncalibrated", "auc", "positives")
                  if v.get(k) is not None} for fig, v in m["tasks"].items() if "pcoc" in v}


def run(variant: str, seed: int, epochs: int, logs: Path) -> dict:
    base = CACHE / "calibration" / f"{logs.name}-{_slug(variant)}-s{seed}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    job = yaml.safe_load((ROOT / "jobs" / "default_job.yaml").read_text())
    job.pop("score", None), job.pop("promote", None), job.pop("warm_start", None)
    job |= {"name": "calib", "data": str(logs.resolve()), "work_dir": str((base / "work").resolve())}
    job["train"] |= {"seed": seed, "epochs": epochs, "checkpoint_every": 0, **VARIANTS[variant]}
    (base / "job.yaml").write_text(yaml.safe_dump(job))
    r = subprocess.run([*MTRANK, "train", "--config", str(base / "job.yaml"), "--date", DATE, "--no-track"],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"train failed ({variant}, seed {seed}):\n{r.stderr[-3000:]}")
    return _figures(json.loads((base / "work" / "runs" / job["name"] / DATE / "metrics.json").read_text()))


def _slug(variant: str) -> str:
    return variant.replace(" ", "").replace(",", "-").replace("%", "")


def run_real(ds, spec: Path, variant: str, seed: int) -> dict:
    from bench.real_bench import TRAIN, train_job
    tag = f"calib-{_slug(variant)}-s{seed}"
    metrics, _ = train_job(ds, spec, ds.logs.parent / "calibration" / tag, tag,
                           {**TRAIN, "seed": seed, **VARIANTS[variant]})
    return _figures(metrics)


def table(title: str, note: str, runs: dict[str, list[dict]]) -> list[str]:
    def cell(variant: str, fig: str, key: str) -> str:
        vals = [r[fig][key] for r in runs[variant] if key in r.get(fig, {})]
        return f"{statistics.median(vals):.3f} ({min(vals):.3f}–{max(vals):.3f})" if vals else ""

    figs = list(runs["none"][0])
    variants = [v for v in runs if v != "none"]
    md = [f"### {title}\n", note + "\n",
          "| figure | PCOC, no calibration | " + " | ".join(f"PCOC before / after Platt ({v.removeprefix('platt').lstrip(', ')})" for v in variants)
          + " | AUC, no calibration | positives | the day's 95 % noise around PCOC (median lo–hi) |",
          "|---|---|" + "---|" * len(variants) + "---|---|---|"]
    for f in figs:
        noise = [r[f] for r in runs["none"] if r.get(f, {}).get("pcoc_hi") is not None]
        band = (f"{statistics.median(m['pcoc_lo'] / m['pcoc'] for m in noise):.3f}–"
                f"{statistics.median(m['pcoc_hi'] / m['pcoc'] for m in noise):.3f} × PCOC" if noise else "")
        pos = [r[f]["positives"] for r in runs["none"] if "positives" in r.get(f, {})]
        md.append(f"| {f} | {cell('none', f, 'pcoc')} | " + " | ".join(
            f"{cell(v, f, 'pcoc_uncalibrated')} → **{cell(v, f, 'pcoc')}**" for v in variants)
            + f" | {cell('none', f, 'auc')} | {int(statistics.median(pos)) if pos else ''} | {band} |")
    md.append("")
    for v in ["none", *variants]:
        worst = max(abs(statistics.median(r[f]["pcoc"] for r in runs[v]) - 1) for f in figs)
        md.append(f"- largest |median PCOC − 1|, {v}: {worst:.3f} (target ≤ 0.05)")
    return md + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1 (add seeds to a run)")
    ap.add_argument("--epochs", type=int, default=1, help="demo epochs (real data: real_bench's)")
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--real", default="", help="comma-separated real data sets of bench/real_bench.py")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--rows-per-day", type=int, default=ROWS, help="demo logs' rows a day (8 days, seed 7)")
    ap.add_argument("--results", default="calibration", help="results file stem under bench/results")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated subset of: " + "; ".join(VARIANTS),
                    type=lambda v: ["none", *[x for x in VARIANTS if x != "none" and x in map(str.strip, v.split(";"))]])
    a = ap.parse_args()
    if a.quick:
        a.seeds = 1
    loads, md, raw = [], ["## Calibration (PCOC on the evaluation day)\n"], {}
    if not a.no_demo:
        logs = ensure_logs(a.rows_per_day)
        runs: dict[str, list[dict]] = {v: [] for v in a.variants}
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            for variant in runs:           # interleaved: every variant once per seed
                runs[variant].append(run(variant, seed, a.epochs, logs))
                loads.append(os.getloadavg()[0])
                print(f"demo seed {seed} {variant}: " + ", ".join(
                    f"{f} {v['pcoc']:.3f}" for f, v in runs[variant][-1].items()), flush=True)
        raw["demo"] = runs
        md += table("Demo workload", f"demo logs (8 days x {a.rows_per_day:,} rows, seed 7), demo job (7-day window), {a.epochs} "
                    f"epoch(s); median (min–max) over training seeds {a.first_seed}..{a.first_seed + a.seeds - 1}. `last day`: validation_days "
                    "1 (trains on 6 days); `10% of requests`: validation_fraction 0.1 (trains on 90 % of the "
                    "requests of all 7 days)", runs)
    for name in filter(None, a.real.split(",")):
        from bench.real_bench import DATASETS, make_spec
        ds = DATASETS[name]()
        spec = make_spec(ds, ids=True)
        runs = {v: [] for v in a.variants}
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            for variant in runs:
                runs[variant].append(run_real(ds, spec, variant, seed))
                loads.append(os.getloadavg()[0])
                print(f"{name} seed {seed} {variant}: " + ", ".join(
                    f"{f} {v['pcoc']:.3f}" for f, v in runs[variant][-1].items()), flush=True)
        raw[name] = runs
        md += table(name, f"{ds.note}; spec from `init-spec` with ids; real_bench's model and training; median "
                    f"(min–max) over seeds {a.first_seed}..{a.first_seed + a.seeds - 1}", runs)
    md.insert(1, f"machine: {machine()}; load average {min(loads):.2f}–{max(loads):.2f}\n")
    write_results(a.results, {"machine": machine(), "runs": raw, "loads": loads}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
