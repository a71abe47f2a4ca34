"""Negative down-sampling on the standard workload: what each keep rate costs in AUC and calibration,
and what it saves in training time.

Why: `train.negative_sampling` trains on a hashed share of the unclicked rows and shifts the ctr
logit by log(keep_rate) afterwards. Whether that is worth it is a trade-off measured in one run:
AUC of every task and product against keep rate 1 (same seed, same window, same evaluation day,
which is never sampled), PCOC of ctr after and before the recalibration, and training time.

Every job runs through the CLI as a user would (`mtrank train --config JOB --date D --no-track`)
and every figure comes from the run's metrics.json. Repetitions vary the training seed
(initialisation and batch order; the kept rows are a hash of the row, so they do not change) and
interleave the keep rates, rotating their order per repetition so that no rate always runs first
or last on the shared machine. Deltas and ratios are taken per repetition against keep rate 1 of
the same seed, then summarised as median (min-max).

    nice -n 10 .venv/bin/python -m bench.negative_sampling_bench [--quick] [--reps 3] [--rates 1,0.5,0.2,0.1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from bench.common import CACHE, RESULTS, machine, write_results
from bench.mtrank_run import EVAL_DAY, ROOT, TRAIN_DAY, ensure_data

MTRANK = [sys.executable, "-m", "mtrank.jobs.cli"]
TASK = "ctr"
FIGURES = ("ctr", "cvr", "ctcvr", "collect", "ctcollect", "cart", "ctcart")


def quick_data(row_groups: int = 4) -> str:
    """The quick variant's logs: the first row groups of the standard day 1 (what `first_rows(...,
    200_000)` trains on in the other benches: 4 x 65,536 rows) and the standard day 2. The file keeps
    its name and row-group layout, so the same rows are kept as in the full-size logs."""
    ensure_data()
    root = CACHE / f"std-1000000-first{row_groups}rg"
    src = ROOT / f"dt={TRAIN_DAY}" / "part-00000.parquet"
    dst = root / f"dt={TRAIN_DAY}" / "part-00000.parquet"
    ev = root / f"dt={EVAL_DAY}" / "part-00000.parquet"
    if not (dst.exists() and ev.exists()):
        f = pq.ParquetFile(src)
        size = f.metadata.row_group(0).num_rows
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / ".part-00000.parquet"
        pq.write_table(f.read_row_groups(list(range(row_groups))), tmp, row_group_size=size)
        tmp.replace(dst)
        ev.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / f"dt={EVAL_DAY}" / "part-00000.parquet", ev)
    return str(root)


def run_job(data: str, rate: float, seed: int, eval_rows: int, work: Path) -> dict:
    """One `mtrank train` job (the standard workload's model and optimiser: the job defaults);
    returns the figures of its metrics.json and deletes the run (checkpoints are ~1 GB)."""
    base = work / f"k{rate:g}-s{seed}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    train = {"seed": seed, "epochs": 1, "batch_size": 4096, "lr": 1e-3}
    if rate < 1:
        train["negative_sampling"] = {"task": TASK, "keep_rate": rate}
    job = {"name": "negsamp", "data": str(Path(data).resolve()), "window_days": 1,
           "work_dir": str((base / "work").resolve()), "train": train, "eval": {"max_rows": eval_rows}}
    (base / "job.yaml").write_text(yaml.safe_dump(job))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([*MTRANK, "train", "--config", str(base / "job.yaml"), "--date", str(EVAL_DAY), "--no-track"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"mtrank train failed (keep rate {rate}, seed {seed}):\n{r.stderr[-3000:]}")
    m = json.loads((base / "work" / "runs" / "negsamp" / str(EVAL_DAY) / "metrics.json").read_text())
    shutil.rmtree(base / "work")
    tasks, rows = m["tasks"], m["rows"]
    ctr = tasks[TASK]
    return {
        "keep_rate": rate, "seed": seed, "job_seconds": round(wall, 2),
        "train_seconds": round(m["train_seconds"], 2),
        "samples_per_s": round(rows["trained"] / m["train_seconds"], 1),
        "rows_read": rows["read"], "rows_trained": rows["trained"], "rows_sampled_out": rows["sampled_out"],
        "rows_rejected": rows["rejected"], "eval_rows": m["eval_rows"],
        "auc": {k: v["auc"] for k, v in tasks.items() if v.get("auc") is not None},
        "oracle_auc": {k: v["oracle_auc"] for k, v in tasks.items() if v.get("oracle_auc") is not None},
        "pcoc": {k: v["pcoc"] for k, v in tasks.items() if v.get("pcoc") is not None},
        # without a calibration the job writes no *_uncalibrated figure: the output is its own "before"
        "pcoc_uncalibrated": ctr.get("pcoc_uncalibrated", ctr["pcoc"]),
        "logloss": ctr["logloss"], "logloss_uncalibrated": ctr.get("logloss_uncalibrated", ctr["logloss"]),
        "calibration": m.get("calibration"), "loadavg": [load0, os.getloadavg()[0]],
    }


def med(xs: list[float], fmt: str) -> str:
    """median (min-max), or the one value."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def summarise(runs: list[dict], rates: list[float]) -> dict:
    """Per keep rate: every figure's values over the repetitions, and the paired deltas/ratios against
    keep rate 1 of the same seed."""
    by = {(r["keep_rate"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if (1.0, r["seed"]) in by})
    out = {}
    for rate in rates:
        mine = [by[(rate, s)] for s in seeds if (rate, s) in by]
        ref = [by[(1.0, s)] for s in seeds if (rate, s) in by]
        figs = sorted({f for r in mine for f in r["auc"]}, key=lambda f: FIGURES.index(f) if f in FIGURES else 99)
        out[str(rate)] = {
            "seeds": [r["seed"] for r in mine],
            "auc": {f: [r["auc"][f] for r in mine] for f in figs},
            "auc_delta": {f: [r["auc"][f] - b["auc"][f] for r, b in zip(mine, ref)] for f in figs},
            "oracle_auc": mine[0]["oracle_auc"],
            **{k: [r[k] for r in mine] for k in ("pcoc_uncalibrated", "logloss", "logloss_uncalibrated",
                                                  "train_seconds", "job_seconds", "samples_per_s",
                                                  "rows_trained", "rows_sampled_out")},
            "pcoc_ctr": [r["pcoc"][TASK] for r in mine],
            "pcoc_ctcvr": [r["pcoc"].get("ctcvr") for r in mine],
            "time_ratio": [r["train_seconds"] / b["train_seconds"] for r, b in zip(mine, ref)],
            "job_time_ratio": [r["job_seconds"] / b["job_seconds"] for r, b in zip(mine, ref)],
            "logloss_delta": [r["logloss"] - b["logloss"] for r, b in zip(mine, ref)],
        }
    return out


def markdown(summary: dict, rates: list[float], info: dict) -> str:
    s1 = summary[str(1.0)]
    figs = list(s1["auc"])
    md = ["## Negative down-sampling (`train.negative_sampling`, task ctr)\n",
          f"machine: {info['machine']}; standard workload: {info['rows_read']:,} rows of {TRAIN_DAY} "
          f"(click rate {info['click_rate']:.4f}), evaluated on the first {info['eval_rows']:,} rows of {EVAL_DAY} "
          f"(never sampled); MMoE 8x[256,128], towers [64], ESMM, batch 4096, one epoch, fp32. "
          f"Median (min–max) of {info['reps']} interleaved repetitions (training seeds {info['seeds']}); "
          f"deltas and ratios are paired with keep rate 1 of the same seed. 1-min load average during the run "
          f"{info['load'][0]:.2f}–{info['load'][1]:.2f}.\n",
          "| keep rate | rows trained | sampled out | train s | time vs 1 | samples/s | AUC ctr | ΔAUC ctr vs 1 | "
          "PCOC ctr | PCOC ctr before recalibration | logloss ctr | Δlogloss vs 1 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate in rates:
        s, ref = summary[str(rate)], rate == 1.0
        md.append(f"| {rate:g} | {statistics.median(s['rows_trained']):,.0f} | {statistics.median(s['rows_sampled_out']):,.0f} "
                  f"| {med(s['train_seconds'], '.1f')} | {'1.00' if ref else med(s['time_ratio'], '.2f')}× "
                  f"| {med(s['samples_per_s'], ',.0f')} "
                  f"| {med(s['auc']['ctr'], '.4f')} | {'–' if ref else med(s['auc_delta']['ctr'], '+.4f')} "
                  f"| {med(s['pcoc_ctr'], '.3f')} | {med(s['pcoc_uncalibrated'], '.3f')} "
                  f"| {med(s['logloss'], '.4f')} | {'–' if ref else med(s['logloss_delta'], '+.4f')} |")
    md += ["", "AUC of every task (on its population) and entire-space product, median over the repetitions; "
               "ΔAUC against keep rate 1 of the same seed as median (min–max):\n",
           "| figure | oracle | keep 1 (min–max over seeds) | "
           + " | ".join(f"Δ keep {r:g}" for r in rates if r != 1.0) + " |",
           "|---|---|---|" + "---|" * sum(r != 1.0 for r in rates)]
    for f in figs:
        o = s1["oracle_auc"].get(f)
        md.append(f"| {f} | {'-' if o is None else format(o, '.4f')} | {med(s1['auc'][f], '.4f')} | "
                  + " | ".join(med(summary[str(r)]["auc_delta"][f], "+.4f") for r in rates if r != 1.0) + " |")
    md += ["", "Job wall time (the whole CLI process: numeric statistics, training, evaluation, report) vs keep "
               "rate 1: " + ", ".join(f"keep {r:g} {med(summary[str(r)]['job_time_ratio'], '.2f')}×" for r in rates if r != 1.0)
           + "; PCOC of the ctcvr product: "
           + ", ".join(f"keep {r:g} {med([x for x in summary[str(r)]['pcoc_ctcvr'] if x is not None], '.3f')}"
                       for r in rates) + ".\n"]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="262,144 training rows (first 4 row groups), 50k evaluation rows")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (training seeds 0..reps-1)")
    ap.add_argument("--rates", default="1,0.5,0.2,0.1", help="keep rates; 1 (the reference) is always included")
    ap.add_argument("--from-partial", action="store_true",
                    help="report what an interrupted run left (bench/results/negative_sampling[-quick].partial.json)")
    a = ap.parse_args()
    rates = sorted({1.0, *(float(x) for x in a.rates.split(","))}, reverse=True)
    data, eval_rows = (quick_data(), 50_000) if a.quick else (ensure_data(), 200_000)
    name = "negative_sampling-quick" if a.quick else "negative_sampling"
    work = CACHE / "negsamp-work"
    partial = RESULTS / f"{name}.partial.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = json.loads(partial.read_text()) if a.from_partial else []
    if a.from_partial:   # only complete repetitions pair every rate with its keep-1 run
        reps = len({r["seed"] for r in runs if sum(x["seed"] == r["seed"] for x in runs) == len(rates)})
        runs = [r for r in runs if r["seed"] < reps]
        a.reps = reps
    for rep in range(0 if a.from_partial else a.reps):
        order = rates[rep % len(rates):] + rates[:rep % len(rates)]
        for rate in order:
            r = run_job(data, rate, rep, eval_rows, work)
            runs.append(r)
            partial.write_text(json.dumps(runs, indent=1))
            print(f"rep {rep + 1}/{a.reps} keep {rate:g}: trained {r['rows_trained']:,} rows in "
                  f"{r['train_seconds']:.1f}s ({r['samples_per_s']:,.0f}/s), AUC ctr {r['auc']['ctr']:.4f}, "
                  f"PCOC {r['pcoc']['ctr']:.3f} (before {r['pcoc_uncalibrated']:.3f}), load {r['loadavg'][1]:.2f}",
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)
    summary = summarise(runs, rates)
    loads = [x for r in runs for x in r["loadavg"]]
    ref = next(r for r in runs if r["keep_rate"] == 1.0)
    info = {"machine": machine(), "reps": a.reps, "seeds": ", ".join(str(s) for s in range(a.reps)),
            "rows_read": ref["rows_read"], "eval_rows": ref["eval_rows"], "click_rate": click_rate(data),
            "load": (min(loads), max(loads))}
    write_results(name, {"info": {**info, "data": data, "rates": rates}, "runs": runs, "summary": summary},
                  markdown(summary, rates, info))
    partial.unlink(missing_ok=True)


def click_rate(data: str) -> float:
    """Click rate of the training day (what the keep rates act on)."""
    t = pq.read_table(Path(data) / f"dt={TRAIN_DAY}" / "part-00000.parquet", columns=["click"])
    return float(t.column("click").to_numpy().mean())


if __name__ == "__main__":
    main()
