"""Training speed on the standard workload: mtrank vs torch-rechub, deepctr-torch and the compute
reference, all measured in this run (BENCHMARKS.md).

Every runner is a child process printing one JSON line (so peak RSS is its own); repetitions are
interleaved (A B C ... A B C ...) so a slow minute on the shared machine hits every runner alike.
Figures are samples/s of the training epoch with data loading included, median (min-max) over the
repetitions; ratios are of medians. Peers run in the bench venv (`make bench-venv`). mtrank trains
its default model (ESMM with the clicked-row tower term; `bench.mtrank_run --esmm`), in fp32 and bf16.

    .venv/bin/python -m bench.train_bench [--quick] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import machine, write_results
from bench.mtrank_run import ensure_data
from mtrank.jobs.process_memory import TRIM_BYTES

BENCH_PY = Path(".mtrank/bench-venv/bin/python")

# glibc told what `mtrank` sets with mallopt at start (jobs/process_memory.py): large blocks from the
# heap, freed memory kept; for the reference arms that measure the same allocator setting
KEEP_FREED = {"GLIBC_TUNABLES": f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_BYTES}"}
RUNNERS = [  # (key, python, module, extra args[, extra environment])
    ("reference fp32", sys.executable, "bench.peers.reference", []),
    ("reference bf16", sys.executable, "bench.peers.reference", ["--bf16"]),
    ("reference fp32, freed memory kept", sys.executable, "bench.peers.reference", [], KEEP_FREED),
    ("reference bf16, freed memory kept", sys.executable, "bench.peers.reference", ["--bf16"], KEEP_FREED),
    ("mtrank fp32", sys.executable, "bench.mtrank_run", []),
    ("mtrank bf16", sys.executable, "bench.mtrank_run", ["--bf16"]),
    ("mtrank bf16, glibc's malloc default", sys.executable, "bench.mtrank_run", ["--bf16"],
     {"MTRANK_KEEP_FREED_MEMORY": "0"}),
    ("mtrank fp32, no ESMM", sys.executable, "bench.mtrank_run", ["--no-esmm"]),   # towers as the peers'
    ("mtrank bf16, no ESMM", sys.executable, "bench.mtrank_run", ["--bf16", "--no-esmm"]),
    ("torch-rechub 0.9.0", str(BENCH_PY), "bench.peers.rechub_mmoe", []),
    ("deepctr-torch 0.3.0", str(BENCH_PY), "bench.peers.deepctr_mmoe", []),
]
AUC_TASKS = ("ctr", "cvr", "ctcvr", "collect", "cart")


def run(python: str, module: str, args: list[str], extra_env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **(extra_env or {})}
    out = subprocess.run([python, "-m", module, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{module} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_rate(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k training rows, 50k evaluation rows")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="runner keys to include")
    ap.add_argument("--rows", type=int, default=None, help="training rows (default 1M, --quick 200k)")
    a = ap.parse_args()
    rows, eval_rows = (200_000, 50_000) if a.quick else (1_000_000, 200_000)
    if a.rows:
        rows, eval_rows = a.rows, min(eval_rows, a.rows)
    ensure_data()
    runners = [r for r in RUNNERS if a.only is None or r[0] in a.only]
    if any(r[1] == str(BENCH_PY) for r in runners) and not BENCH_PY.exists():
        subprocess.run(["bash", "bench/peers/setup_venv.sh"], check=True)
    results: dict[str, list[dict]] = {r[0]: [] for r in runners}
    loads = []
    for rep in range(a.reps):
        for key, py, module, extra, *env in runners:
            res = run(py, module, ["--rows", str(rows), *(["--eval-rows", str(eval_rows)] if "reference" not in key else []), *extra],
                      *env)
            results[key].append(res)
            loads.append(os.getloadavg()[0])
            print(f"rep {rep + 1}/{a.reps} {key}: {res['samples_per_s']:,.0f} samples/s, "
                  f"peak RSS {res['peak_rss_mb']:,.0f} MB", flush=True)

    med = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in results.items()}
    ref_b = med.get("reference bf16")
    ref = med.get("reference fp32")
    rechub = med.get("torch-rechub 0.9.0")
    md = ["## Training throughput, standard workload (one epoch, data loading included)\n",
          f"machine: {machine()}; {rows:,} training rows, AUC on the first {eval_rows:,} rows of the next day; "
          f"median (min-max) of {a.reps} interleaved repetitions; 1-min load average during the run "
          f"{min(loads):.2f}-{max(loads):.2f}\n",
          "| trainer | samples/s | vs reference fp32 | vs reference bf16 | vs torch-rechub | peak RSS MB | "
          + " | ".join(f"AUC {t}" for t in AUC_TASKS) + " |",
          "|---|---|---|---|---|---|" + "---|" * len(AUC_TASKS)]

    def vs(x: float, base: float | None) -> str:
        return f"{x / base:.2f}x" if base else "-"

    for key, runs in results.items():
        rates = [r["samples_per_s"] for r in runs]
        auc = runs[-1].get("auc", {})
        md.append(f"| {key} | {fmt_rate(rates)} | {vs(med[key], ref)} | {vs(med[key], ref_b)} | {vs(med[key], rechub)} | "
                  f"{max(r['peak_rss_mb'] for r in runs):,.0f} | "
                  + " | ".join(f"{auc[t]:.4f}" if t in auc else "-" for t in AUC_TASKS) + " |")
    oracle = next((r[-1]["oracle_auc"] for k, r in results.items() if r and "oracle_auc" in r[-1]), {})
    if oracle:
        md.append("| oracle (true probabilities) | | | | | | "
                  + " | ".join(f"{oracle[t]:.4f}" if t in oracle else "-" for t in AUC_TASKS) + " |")
    for suffix in ("", ", no ESMM"):
        if f"mtrank fp32{suffix}" in med and f"mtrank bf16{suffix}" in med:
            f32, b16 = results[f"mtrank fp32{suffix}"][-1]["auc"], results[f"mtrank bf16{suffix}"][-1]["auc"]
            worst = max(f32, key=lambda t: abs(f32[t] - b16[t]))
            md.append(f"\nbf16 vs fp32 AUC{suffix}: largest per-task difference {b16[worst] - f32[worst]:+.5f} "
                      f"({worst}; unrounded AUCs of one seed: `bench.bf16_auc_bench` tests it over paired seeds).")
    md.append("\nPeer settings (what had to change to run them on this workload):\n")
    for key, runs in results.items():
        if "settings" in runs[-1] and ("rechub" in key or "deepctr" in key):
            md.append(f"- **{key}**: " + "; ".join(f"{k}: {v}" for k, v in runs[-1]["settings"].items()))
    write_results("train" if a.only is None else "train-subset", {"machine": machine(), "rows": rows, "results": results, "medians": med},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
