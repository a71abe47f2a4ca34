"""Daily increments vs daily full retrains vs a frozen model, on logs with drifting item popularity.

Generated logs span 12 days with `popularity_drift` (a share of items re-draws its popularity every
day). Every strategy starts from the same model, trained from scratch on days 1-7. Then for each
following day D (evaluated on D, trained on what came before):
  (a) warm:   continue yesterday's model on day D-1 only (mtrank's daily warm start: weights,
              optimizer state, running numeric statistics);
  (b) full:   retrain from scratch on the 7 days before D;
  (c) frozen: the day-7 model, never updated.
Reported: AUC per task per day, the training loop's seconds per day (`fit s`) and the whole job's
(`job s`: statistics pass, model build or warm start, training, evaluation and report). Uses jobs.train.train, the code `mtrank daily` runs (without MLflow).

    .venv/bin/python -m bench.warm_start_bench [--quick] [--rows N] [--drift F]
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import time

import torch

from bench.common import CACHE, RESULTS, machine, write_results
from mtrank.jobs.config import load_config
from mtrank.jobs.model_io import load_model
from mtrank.jobs.train import Parent, train
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import predict, task_metrics
from mtrank.pipeline.reader import ImpressionReader
from mtrank.features.featurize import Featurizer
from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

START = dt.date(2026, 11, 1)
TASKS = ("ctr", "ctcvr", "cvr", "cart", "collect")


def evaluate(model_dir, root, day: dt.date) -> dict:
    saved = load_model(model_dir)
    reader = ImpressionReader(open_window(root, saved.spec, day, day), saved.spec, Featurizer(saved.spec, saved.stats),
                              batch_size=16_384, with_eval=True, progress=False)
    m = task_metrics(predict(saved.model, reader), saved.spec)
    return {t: m[t]["auc"] for t in TASKS if t in m}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 days of 20k rows, a small model")
    ap.add_argument("--rows", type=int, default=None, help="impressions per day")
    ap.add_argument("--days", type=int, default=None, help="days of logs (>= 10)")
    ap.add_argument("--drift", type=float, default=0.15, help="share of items re-drawing popularity per day")
    a = ap.parse_args()
    rows = a.rows or (20_000 if a.quick else 100_000)
    days = a.days or (10 if a.quick else 12)
    torch.set_num_threads(2)
    root = CACHE / f"drift-{rows}-{days}-{a.drift}"
    if not (root / f"dt={START + dt.timedelta(days=days - 1)}").exists():
        generate_impressions(root, ImpressionConfig(seed=5, start=START, days=days, rows_per_day=rows,
                                                    n_users=200_000, n_items=50_000, popularity_drift=a.drift),
                             progress=False)
    work = CACHE / "drift-work"
    shutil.rmtree(work, ignore_errors=True)
    model = {"experts": 4, "expert_mlp": [64, 32], "tower_mlp": [32]} if a.quick else \
        {"experts": 8, "expert_mlp": [256, 128], "tower_mlp": [64]}
    base = {"data": str(root), "window_days": 7, "model": model,
            "train": {"batch_size": 2048, "epochs": 1, "lr": 0.002, "seed": 0, "checkpoint_every": 0},
            "warm_start": {"from": "champion", "days": 1}}
    cfgs = {s: load_config(None, **base, name=f"drift-{s}", work_dir=str(work / s)) for s in ("warm", "full")}

    first = START + dt.timedelta(days=7)          # the first evaluation day; days 1-7 train the start model
    t0 = time.perf_counter()
    start = train(cfgs["full"], first)
    start_s = time.perf_counter() - t0
    start_dir = start.run_dir / "model"
    rows_out = [{"day": str(first), "strategy": s, "auc": {t: start.metrics[t]["auc"] for t in TASKS},
                 "train_s": start.summary["train_seconds"], "job_s": start_s, "trained_rows": start.result.rows_trained}
                for s in ("warm", "full", "frozen")]
    warm_dir, warm_depth = start_dir, 0
    for i in range(1, days - 7):
        day = first + dt.timedelta(days=i)
        t0 = time.perf_counter()
        parent = Parent(str(i), load_model(warm_dir, with_optimizer=True), root_version="0", depth=warm_depth,
                        source="previous day")
        w = train(cfgs["warm"], day, parent=parent)
        warm_s = time.perf_counter() - t0
        warm_dir, warm_depth = w.run_dir / "model", warm_depth + 1
        t0 = time.perf_counter()
        f = train(cfgs["full"], day)
        full_s = time.perf_counter() - t0
        frozen = evaluate(start_dir, root, day)
        rows_out += [
            {"day": str(day), "strategy": "warm", "auc": {t: w.metrics[t]["auc"] for t in TASKS},
             "train_s": w.summary["train_seconds"], "job_s": warm_s, "trained_rows": w.result.rows_trained},
            {"day": str(day), "strategy": "full", "auc": {t: f.metrics[t]["auc"] for t in TASKS},
             "train_s": f.summary["train_seconds"], "job_s": full_s, "trained_rows": f.result.rows_trained},
            {"day": str(day), "strategy": "frozen", "auc": frozen, "train_s": 0.0, "job_s": 0.0, "trained_rows": 0}]
        print(f"{day}: warm {w.metrics['ctr']['auc']:.4f} ({warm_s:.0f}s)  full {f.metrics['ctr']['auc']:.4f} "
              f"({full_s:.0f}s)  frozen {frozen['ctr']:.4f}", flush=True)

    later = [r for r in rows_out if r["day"] != str(first)]

    def mean(strategy: str, key: str) -> float:
        vals = [r["auc"][key] if key in TASKS else r[key] for r in later if r["strategy"] == strategy]
        return statistics.mean(vals)

    md = [f"# Warm start vs full retrain vs frozen: {days} days × {rows:,} rows, popularity drift {a.drift}/day",
          "", f"Model {model}; start model trained from scratch on days 1-7; then each day D is evaluated "
          "with (a) yesterday's model continued on D-1, (b) a fresh model on the 7 days before D, "
          "(c) the day-7 model unchanged. AUC on day D (CVR, cart, collect on clicked rows).", "",
          "| day | strategy | " + " | ".join(TASKS) + " | fit s | job s | trained rows |",
          "|---|---|" + "---|" * len(TASKS) + "---|---|---|"]
    for r in rows_out:
        md.append(f"| {r['day']} | {r['strategy']} | " + " | ".join(f"{r['auc'][t]:.4f}" for t in TASKS)
                  + f" | {r['train_s']:.1f} | {r['job_s']:.1f} | {r['trained_rows']:,} |")
    md += ["", "Means over the days after the first (where the strategies differ):", "",
           "| strategy | " + " | ".join(TASKS) + " | fit s / day | job s / day |", "|---|" + "---|" * (len(TASKS) + 2)]
    for s in ("warm", "full", "frozen"):
        md.append(f"| {s} | " + " | ".join(f"{mean(s, t):.4f}" for t in TASKS)
                  + f" | {mean(s, 'train_s'):.1f} | {mean(s, 'job_s'):.1f} |")
    cost = mean("warm", "job_s") / mean("full", "job_s")
    md += ["", "warm − full, mean AUC: " + ", ".join(f"{t} {mean('warm', t) - mean('full', t):+.4f}" for t in TASKS)
           + f"; a warm day's job costs {cost:.0%} of a full retrain's "
           f"(training loop alone: {mean('warm', 'train_s') / mean('full', 'train_s'):.0%}).",
           "warm − frozen, mean AUC: " + ", ".join(f"{t} {mean('warm', t) - mean('frozen', t):+.4f}" for t in TASKS),
           "", "![AUC per day](warm_start.png)", ""]
    _plot(rows_out, [r["day"] for r in rows_out if r["strategy"] == "warm"])
    write_results("warm_start" if not a.quick else "warm_start-quick",
                  {"machine": machine(), "rows_per_day": rows, "days": days, "drift": a.drift, "model": model,
                   "results": rows_out}, "\n".join(md))


def _plot(rows_out: list[dict], days: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, task in zip(axes, ("ctr", "ctcvr", "cvr")):
        for s, style in (("warm", "o-"), ("full", "s--"), ("frozen", "^:")):
            ax.plot(range(len(days)), [r["auc"][task] for r in rows_out if r["strategy"] == s], style, label=s)
        ax.set_title(f"{task} AUC by evaluation day")
        ax.set_xticks(range(len(days)), [d[5:] for d in days], rotation=45)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "warm_start.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
