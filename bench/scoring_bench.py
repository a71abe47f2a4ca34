"""Scoring speed (BENCHMARKS.md): fusion + rules vs a per-request Python loop, and `mtrank score`
end to end vs the model's bare forward pass on the same rows.

Candidates are a generated day (10,000 requests × 100 items by default) of the standard benchmark
universe; today's exposures come from that day's generated impression log, so traffic caps bind for
popular items. Fusion + rules read the generator's true probabilities as task outputs (no model
needed); the loop (bench/scoring_loop.py) must give identical ranks and rule flags.

    .venv/bin/python -m bench.scoring_bench [--quick] [--requests N] [--reps N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.common import CACHE, machine, repeat, write_results
from bench.mtrank_run import EVAL_DAY, ROOT, TRAIN_DAY, ensure_data
from bench.scoring_loop import score_loop
from mtrank.features.featurize import Featurizer
from mtrank.features.outputs import OutputKind
from mtrank.features.spec import load_spec
from mtrank.jobs.config import load_config
from mtrank.jobs.exposures import count_exposures
from mtrank.jobs.model_io import load_model, save_model
from mtrank.jobs.process_memory import keep_freed_memory
from mtrank.jobs.score import read_exposures, score
from mtrank.pipeline.batch import batch_from_arrays
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import eval_mode, overlap_pays, predict_batch
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from mtrank.pipeline.scoring import score_candidates
from mtrank.pipeline.scoring.fusion import resolve
from mtrank.pipeline.synthetic.candidates import generate_candidates
from mtrank.pipeline.synthetic.impressions import ImpressionConfig
from mtrank.pipeline.trainer import build_model



def truth_outputs(spec, table) -> dict:
    """The generator's true values as model outputs: each task's own output (named by the spec's
    OutputSchema) read from its ground-truth column, and each entire-space product as parent × child."""
    schema = spec.outputs
    out = {schema.own(t).name: table[c].to_numpy() for t, c in spec.ground_truth.items()}
    for f in schema:
        if f.kind is OutputKind.PRODUCT and all(schema.own(t).name in out for t in f.targets):
            v = out[schema.own(f.targets[0]).name]
            for t in f.targets[1:]:
                v = v * out[schema.own(t).name]
            out[f.name] = v
    return out


def ensure_candidates(requests: int) -> Path:
    root = CACHE / f"candidates-{requests}"
    if not (root / f"dt={EVAL_DAY}").exists():
        generate_candidates(root, ImpressionConfig(seed=1, start=TRAIN_DAY), EVAL_DAY, requests, 100, progress=False)
    return root


def ensure_model(job) -> Path:
    """The demo job's architecture with statistics fitted on the training day (weights untrained:
    throughput does not depend on them)."""
    path = CACHE / "score-model"
    if (path / "weights.pt").exists():
        return path
    spec = load_spec(None)
    stats = fit_numeric_stats(ImpressionReader(open_window(ROOT, spec, TRAIN_DAY, TRAIN_DAY), spec, progress=False))
    model = build_model(spec, job.model, 0, stats)
    save_model(path, model, spec, stats)
    return path


def bare_forward(model_dir: Path, candidates: Path, inference) -> tuple[int, float]:
    """The forward pass `mtrank score` runs (`predict`: eval and inference mode, the job's rows per
    forward and precision, outputs to numpy) over batches featurized beforehand: the ceiling it chases."""
    saved = load_model(model_dir)
    table = pq.read_table(candidates / f"dt={EVAL_DAY}")
    feat = Featurizer(saved.spec, saved.stats)
    step = inference.forward_rows
    batches = [batch_from_arrays(feat.transform(table.slice(s, step), with_labels=False))
               for s in range(0, table.num_rows, step)]
    del table
    device = torch.device("cpu")
    t0 = time.perf_counter()
    with torch.inference_mode(), eval_mode(saved.model):
        for b in batches:
            predict_batch(saved.model, b, device, inference.precision)
    return sum(b.size for b in batches), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1,000 requests, one repetition")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--bf16", action="store_true",
                    help="also the bf16 pair each repetition: bare forward and `mtrank score` with "
                         "score.inference.precision: bf16 (CPUs with avx512_bf16 / AMX)")
    a = ap.parse_args()
    requests = a.requests or (1_000 if a.quick else 10_000)
    reps = a.reps or (1 if a.quick else 3)
    torch.set_num_threads(2)
    keep_freed_memory()   # as the `mtrank` CLI does at start: the bare forward and `score()` alike
    ensure_data()
    job = load_config(None, data=str(ROOT), work_dir=str(CACHE / "score-work"))
    cfg = job.score
    cand_root = ensure_candidates(requests)
    exposures_path = CACHE / f"exposures-{EVAL_DAY}.parquet"
    if not exposures_path.exists():
        count_exposures(ROOT, EVAL_DAY, exposures_path)
    exposures = read_exposures(str(exposures_path), cfg.item_column, EVAL_DAY)

    # ---------------------------------------------------------------- fusion + rules
    table = pq.read_table(cand_root / f"dt={EVAL_DAY}")
    n = table.num_rows
    spec = load_spec(job.spec)
    plan = resolve(cfg.fusion, spec.outputs)
    outputs = {k: v for k, v in truth_outputs(spec, table).items() if k in plan.required_outputs()}
    side = table.select([c for c in table.column_names if not c.startswith("true_")])
    vec = repeat("vectorised", n, lambda: score_candidates(side, outputs, cfg, plan, exposures=exposures), reps=reps)
    res = score_candidates(side, outputs, cfg, plan, exposures=exposures)
    seen = dict(zip(exposures[cfg.item_column].to_pylist(), exposures["exposures"].to_pylist()))
    t0 = time.perf_counter()
    rank, flags, _ = score_loop(side, outputs, cfg, plan, exposures=seen)
    loop_s = time.perf_counter() - t0
    d = res.table.select(["request_id", "item_id", "rank", "rule_flags"]).to_pydict()
    got = {(r, i): (k or 0, f) for r, i, k, f in zip(d["request_id"], d["item_id"], d["rank"], d["rule_flags"])}
    want = {(r, i): (k, f) for r, i, k, f in zip(side["request_id"].to_pylist(), side["item_id"].to_pylist(), rank, flags)}
    identical = got == want

    # ---------------------------------------------------------------- end to end vs bare forward
    model_dir = ensure_model(job)
    out = CACHE / "score-out" / "ranked.parquet"
    # `mtrank score` with the background featurizing thread (the default) and without it (the serial
    # path: read, featurize, forward one chunk after another), interleaved with the bare forward
    e2e, parts, serial, serial_parts, loads = [], [], [], [], []
    fwd, bf16_fwd, bf16_e2e, bf16_parts = [], [], [], []
    bf16_cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"precision": "bf16"})})
    for _ in range(reps):
        loads.append(round(os.getloadavg()[0], 2))
        rows, s = bare_forward(model_dir, cand_root, cfg.inference)
        fwd.append(rows / s)
        if a.bf16:   # the bf16 pair: the job as configured otherwise (overlap: auto)
            rows, s = bare_forward(model_dir, cand_root, bf16_cfg.inference)
            bf16_fwd.append(rows / s)
            t0 = time.perf_counter()
            r = score(job, str(model_dir), cand_root, EVAL_DAY, out, exposures=str(exposures_path), scoring=bf16_cfg,
                      track=False, progress=False)
            bf16_e2e.append(r.summary["rows_read"] / (time.perf_counter() - t0))
            bf16_parts.append(r.summary["seconds"])
        for overlap, rates, phases in ((True, e2e, parts), (False, serial, serial_parts)):
            sc = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"overlap": overlap})})
            t0 = time.perf_counter()
            r = score(job, str(model_dir), cand_root, EVAL_DAY, out, exposures=str(exposures_path), scoring=sc,
                      track=False, progress=False)
            rates.append(r.summary["rows_read"] / (time.perf_counter() - t0))
            phases.append(r.summary["seconds"])
    auto = overlap_pays(load_model(model_dir).model)
    fwd_rate, e2e_rate, serial_rate = statistics.median(fwd), statistics.median(e2e), statistics.median(serial)
    loop_rate = n / loop_s
    payload = {
        "machine": machine(), "candidates": n, "requests": requests, "reps": reps,
        "config": cfg.model_dump(mode="json"), "formula": plan.formula(),
        "rules": {"vectorised_per_s": vec.rates, "loop_per_s": loop_rate, "speedup": vec.median / loop_rate,
                  "identical_to_loop": identical, "summary": res.summary},
        "end_to_end": {"score_per_s": e2e, "bare_forward_per_s": fwd, "ratio": e2e_rate / fwd_rate,
                       "phase_seconds": parts, "serial_score_per_s": serial, "serial_ratio": serial_rate / fwd_rate,
                       "serial_phase_seconds": serial_parts, "loadavg_1min_per_rep": loads,
                       "ratio_per_rep": [e / f for e, f in zip(e2e, fwd)],
                       "serial_ratio_per_rep": [e / f for e, f in zip(serial, fwd)], "auto_overlap": auto,
                       "bf16": {"score_per_s": bf16_e2e, "bare_forward_per_s": bf16_fwd, "phase_seconds": bf16_parts,
                                "ratio_per_rep": [e / f for e, f in zip(bf16_e2e, bf16_fwd)]} if a.bf16 else None},
    }
    mid = parts[len(parts) // 2]
    md = [f"# Scoring: {n:,} candidates ({requests:,} requests), median of {reps}, {machine()['cores']} cores", "",
          f"score = {plan.formula()}", "",
          "| what | candidates/s | ratio |", "|---|---|---|",
          f"| fusion + all rules, vectorised (pipeline/scoring) | {vec.cell()} | {vec.median / loop_rate:.1f}x the loop |",
          f"| same rules, per-request Python loop (bench/scoring_loop.py) | {loop_rate:,.0f} | 1.0 |",
          f"| `mtrank score` end to end (read, validate, featurize, forward, rules, write), featurizing in a "
          f"background thread (`score.inference.overlap: true`) | {e2e_rate:,.0f} | "
          f"{e2e_rate / fwd_rate:.0%} of bare forward |",
          f"| same, inline (`overlap: false`) | {serial_rate:,.0f} | {serial_rate / fwd_rate:.0%} of bare forward |",
          f"| model forward pass only (batches prepared beforehand) | {fwd_rate:,.0f} | 100% |",
          *([f"| `mtrank score`, `precision: bf16` | {statistics.median(bf16_e2e):,.0f} | "
             f"{statistics.median(bf16_e2e) / statistics.median(bf16_fwd):.0%} of the bf16 bare forward |",
             f"| bf16 forward pass only | {statistics.median(bf16_fwd):,.0f} | "
             f"{statistics.median(bf16_fwd) / fwd_rate:.2f}x the fp32 forward |"] if a.bf16 else []), "",
          f"Loop and vectorised results identical (rank and rule flags of every candidate): **{identical}**. "
          f"Caps resolved in {res.summary['cap_rounds']} round(s); rule counts: "
          + ", ".join(f"{k} {v:,}" for k, v in res.summary["rules"].items() if v) + ".", "",
          "End-to-end phases (s, middle run): " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in mid.items()),
          "(with the overlap, read_validate and featurize run in the background thread; input_wait is the part "
          "the forward waited for them)", "",
          *([f"bf16 phases (s, middle run): " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in
                                                          bf16_parts[len(bf16_parts) // 2].items()), ""] if a.bf16 else []),
          f"`overlap: auto` (the default) featurizes {'in the background' if auto else 'inline'} here: "
          f"{machine()['cores']} cores, {torch.get_num_threads()} torch threads.", "",
          "Per repetition, score / bare forward (overlap, serial): "
          + ", ".join(f"{a:.0%} / {b:.0%}" for a, b in zip(payload["end_to_end"]["ratio_per_rep"],
                                                            payload["end_to_end"]["serial_ratio_per_rep"]))
          + f"; 1-min load average {', '.join(map(str, loads))} on {machine()['cores']} cores.", ""]
    write_results("scoring" if not a.quick else "scoring-quick", payload, "\n".join(md))


if __name__ == "__main__":
    main()
