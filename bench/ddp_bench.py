"""Data-parallel scaling: `mtrank train` as 1 process vs 2 torchrun ranks on this machine.

The standard workload (BENCHMARKS.md: 1M generated impressions of day 1, the default MMoE + ESMM,
batch 4096) is trained by the real job, `mtrank train --no-track`, evaluated on 200k rows of day 2.
Configurations, interleaved per repetition so a slow minute hits each alike:
  1 rank x 2 threads  what a single process gets from this machine (the baseline)
  2 ranks x 1 thread  DDP over gloo: disjoint row-group shards, the same global batch
  1 rank x 1 thread   the per-core rate, to read the 2-rank figure against (first repetition only)
Reported: training-loop samples/s (data loading included), job wall seconds, per-task AUC and its
difference from the baseline, and what crosses between ranks per step.

    .venv/bin/python -m bench.ddp_bench [--quick] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import CACHE, machine, write_results
from bench.mtrank_run import EVAL_DAY, ensure_data

# (name, ranks, threads per rank, repeated): the per-core rate is context, measured in the first repetition only
CONFIGS = [("1 rank x 2 threads", 1, 2, True), ("2 ranks x 1 thread", 2, 1, True), ("1 rank x 1 thread", 1, 1, False)]
TASKS = ("ctr", "ctcvr", "cvr", "collect", "cart")


def job_file(tmp: Path, root: str, eval_rows: int) -> Path:
    cfg = {"name": "ddp-bench", "data": str(Path(root).resolve()), "window_days": 1, "work_dir": str(tmp / "work"),
           "train": {"batch_size": 4096, "checkpoint_every": 0}, "eval": {"max_rows": eval_rows}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(job: Path, nproc: int, threads: int) -> dict:
    shutil.rmtree(job.parent / "work", ignore_errors=True)       # a fresh run: statistics pass included
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mtrank.jobs.cli", "train", "--config", str(job), "--date", str(EVAL_DAY),
                        "--no-track", "--nproc", str(nproc)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"mtrank train --nproc {nproc} failed:\n{r.stderr[-3000:]}")
    out = json.loads(next((job.parent / "work" / "runs" / "ddp-bench").glob("*/metrics.json")).read_text())
    rows_per_step = re.search(r"sparse table sync \(\w+\) carried (\d+) rows a step", r.stderr)
    return {"samples_per_s": out["epochs"][-1]["samples_per_s"], "wall_s": wall, "train_s": out["train_seconds"],
            "rows": out["rows"], "auc": {t: out["tasks"][t]["auc"] for t in TASKS},
            "table_rows_per_step": int(rows_per_step.group(1)) if rows_per_step else None}


def dense_parameters() -> tuple[int, int]:
    from mtrank.features.spec import load_spec
    from mtrank.models import ModelConfig, MultiTaskRanker
    model = MultiTaskRanker(load_spec(), ModelConfig())
    return sum(p.numel() for p in model.dense_parameters()), model.embeddings.output_dim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200k rows (row groups of 16k), one repetition")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if a.quick:
        from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions
        root = CACHE / "ddp-quick-200000"
        if not (root / f"dt={EVAL_DAY}").exists():
            generate_impressions(root, ImpressionConfig(seed=1, start="2026-11-01", days=2, rows_per_day=200_000,
                                                        row_group_size=16_384), progress=False)
        root, reps, eval_rows = str(root), 1, 100_000
    else:
        root, reps, eval_rows = ensure_data(), a.reps, 200_000
    results: dict[str, list[dict]] = {name: [] for name, _, _, _ in CONFIGS}
    loads = []
    with tempfile.TemporaryDirectory(prefix="mtrank-ddp-bench-") as tmp:
        job = job_file(Path(tmp), root, eval_rows)
        for rep in range(reps):
            for name, nproc, threads, repeated in CONFIGS:
                if rep and not repeated:
                    continue
                results[name].append(run(job, nproc, threads))
                loads.append(os.getloadavg()[0])
                print(f"rep {rep + 1} {name}: {results[name][-1]['samples_per_s']:,.0f} samples/s", flush=True)
    n_dense, width = dense_parameters()
    base = results[CONFIGS[0][0]]

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    rows = base[0]["rows"]["trained"]
    base_auc = {t: statistics.median(r["auc"][t] for r in base) for t in TASKS}
    md = ["## Data-parallel training: 1 process vs 2 torchrun ranks (gloo)\n",
          f"machine: {machine()}; load average during runs {min(loads):.2f}-{max(loads):.2f}",
          f"`mtrank train` on {rows:,} rows (day 1, {root}), MMoE 8x[256,128] + ESMM, global batch 4096, fp32; "
          f"AUC on {eval_rows:,} rows of day 2; median (min-max) of {reps} interleaved repetition(s) "
          "(1 rank x 1 thread: the first only)\n",
          "| configuration | samples/s (training loop) | vs 1 rank x 2 threads | job wall s | "
          + " | ".join(f"AUC {t}" for t in TASKS) + " |",
          "|---|---|---|---|" + "---|" * len(TASKS)]
    for name, _, _, _ in CONFIGS:
        rs = results[name]
        sps = [r["samples_per_s"] for r in rs]
        auc = {t: statistics.median(r["auc"][t] for r in rs) for t in TASKS}
        aucs = " | ".join(f"{auc[t]:.4f}" + ("" if rs is base else f" ({auc[t] - base_auc[t]:+.4f})") for t in TASKS)
        md.append(f"| {name} | {statistics.median(sps):,.0f} ({min(sps):,.0f}-{max(sps):,.0f}) | "
                  f"{statistics.median(sps) / med(base, 'samples_per_s'):.2f}x | {med(rs, 'wall_s'):.1f} | {aucs} |")
    two = results[CONFIGS[1][0]]
    one_thread = results[CONFIGS[2][0]]
    per_step = two[0]["table_rows_per_step"]
    md += ["", f"Every configuration trained {rows:,} rows (read {base[0]['rows']['read']:,}, "
               f"rejected {base[0]['rows']['rejected']:,}); the 2-rank runs too, summed over ranks: "
               f"{two[0]['rows']['trained']:,}.",
           f"Per step the ranks exchange the dense gradients ({n_dense:,} parameters, {n_dense * 4 / 1e6:.1f} MB, "
           f"DDP's bucketed all_reduce) and the touched table rows ({per_step:,} rows a step on average, "
           "sparse all_reduce), plus one 8-byte all_reduce that keeps the ranks in step.",
           f"2 ranks x 1 thread vs 1 rank x 1 thread: {med(two, 'samples_per_s') / med(one_thread, 'samples_per_s'):.2f}x "
           "(data parallelism itself); vs 1 rank x 2 threads: "
           f"{med(two, 'samples_per_s') / med(base, 'samples_per_s'):.2f}x (what this 2-core machine gains)."]
    write_results("ddp" + ("-quick" if a.quick else ""), {"machine": machine(), "results": results,
                                                         "dense_parameters": n_dense, "input_width": width}, "\n".join(md))


if __name__ == "__main__":
    main()
