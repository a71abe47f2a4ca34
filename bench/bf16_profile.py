"""Where one training step of mtrank goes, by kind of work (standard workload, BENCHMARKS.md).

Builds the standard workload's model and trainer exactly as `bench.mtrank_run` does (MMoE 8x[256,128],
towers [64], ESMM, batch 4096, row-wise Adagrad tables + fused Adam), reads the first batches of the
1M-row training day into memory (so the profile is the step alone; the reader's cost per batch is
timed separately), warms up, then runs `--steps` steps under `torch.profiler` (CPU). The step is
`Trainer.step`'s single-process body with `record_function` ranges around each phase; its time
without the profiler is measured first against `Trainer.step` itself, so the mirror is checked.

Every op's *self* time is put in one bucket:

- GEMM: addmm / mm / bmm / baddbmm (and their oneDNN internals);
- casts: aten::to / _to_copy and the copies they do (fp32 <-> bf16);
- layout copies: copy_ / clone / contiguous / cat / index_select outside casts (gathers, transposes);
- element-wise / activation: relu, softmax, add, mul, sum (bias grads), sigmoid, ... of the model;
- embedding bag fwd / bwd: the lookup, its sparse backward and the id remapping;
- loss: the loss terms (forward ranges; backward nodes of the loss ops);
- sparse optimizer (row-wise Adagrad incl. coalesce), dense optimizer (fused Adam), grad clip, zero_grad;
- autograd overhead: the engine's own events (self time of backward nodes), and
- python / dispatch: a phase's wall time not covered by any op (interpreter + dispatcher).

    .venv/bin/python -m bench.bf16_profile [--steps 200] [--warmup 20] [--fp32] [--rows 1000000] [--no-esmm]
                                           [--tag=-NAME] [--order buffer|window]

Writes bench/results/bf16_profile[-fp32].{json,md} (the bucket table, phase table and top ops).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from collections import defaultdict

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from bench.common import RESULTS
from bench.mtrank_run import EVAL_DAY, TRAIN_DAY, ensure_data, first_rows  # noqa: F401
from mtrank.features.featurize import Featurizer
from mtrank.features.spec import load_spec
from mtrank.models import ModelConfig
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.feature_cache import FeatureCache
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from mtrank.pipeline.trainer import TrainConfig, Trainer, build_model

PHASES = ("fwd.embeddings", "fwd.dense", "fwd.outputs", "loss", "zero_grad", "backward", "clip",
          "sparse_opt", "dense_opt")
GEMM = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
        "aten::_addmm_activation", "aten::addbmm"}
CAST = {"aten::to", "aten::_to_copy"}
LAYOUT = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index_select", "aten::reshape",
          "aten::_reshape_alias", "aten::as_strided", "aten::view", "aten::permute", "aten::transpose",
          "aten::expand", "aten::split", "aten::narrow", "aten::slice", "aten::select", "aten::t",
          "aten::unsqueeze", "aten::squeeze", "aten::empty", "aten::empty_like", "aten::empty_strided",
          "aten::resize_", "aten::zeros", "aten::zero_", "aten::fill_", "aten::new_zeros", "aten::unbind",
          "aten::stack", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::squeeze_", "aten::unsqueeze_",
          "aten::set_", "aten::lift_fresh", "aten::result_type", "aten::item", "aten::_local_scalar_dense"}
EMB_WORDS = ("embedding", "EmbeddingBag", "Embedding")
# autograd nodes that come from the loss (and the per-task output ops that only the loss reads)
LOSS_NODES = ("BinaryCrossEntropyWithLogits", "LogSigmoid", "Expm1", "Log1P", "LogBackward", "Neg", "Where",
              "IndexBackward", "MeanBackward", "StackBackward", "PowBackward", "SubBackward", "Clamp",
              "SigmoidBackward", "RsubBackward")
BUCKETS = ("GEMM", "casts", "layout copies", "element-wise / activation", "embedding bag fwd/bwd", "loss",
           "sparse optimizer", "dense optimizer (Adam)", "grad clip", "zero_grad", "autograd overhead",
           "python / dispatch")


def build(rows: int, bf16: bool, esmm: bool, steps: int, order: str = "buffer"):
    spec = load_spec()
    root = ensure_data()
    window = first_rows(open_window(root, spec, TRAIN_DAY, TRAIN_DAY), rows)
    stats = fit_numeric_stats(ImpressionReader(window, spec, progress=False))
    fz = Featurizer(spec, stats)
    mc = ModelConfig(bottom="mmoe", esmm=esmm)
    tc = TrainConfig(precision="bf16" if bf16 else "fp32", feature_cache="off")
    model = build_model(spec, mc, tc.seed, stats)
    trainer = Trainer(model, spec, tc)
    # buffer: the streamed order (a shuffle buffer of rows); window: the memory feature cache's order
    # (one permutation of all `rows`), whose batches touch more distinct table rows
    cache = FeatureCache("memory", 8 << 30) if order == "window" else None
    reader = ImpressionReader(window, spec, fz, batch_size=tc.batch_size, shuffle=tc.shuffle,
                              shuffle_buffer=tc.shuffle_buffer, seed=tc.seed, progress=False, cache=cache)
    t0 = time.perf_counter()
    batches = [b for b in itertools.islice(reader.batches(0), steps) if b.size == tc.batch_size]
    data_ms = 1e3 * (time.perf_counter() - t0) / max(len(batches), 1)
    return trainer, batches, data_ms


def step(tr: Trainer, batch) -> None:
    """`Trainer.step` (single process, CPU) with a range per phase: the same calls in the same order."""
    m = tr.model
    with tr._autocast():
        with record_function("fwd.embeddings"):
            x = m.embeddings(batch)
        with record_function("fwd.dense"):
            raw, gates = m.dense(x)
        with record_function("fwd.outputs"):
            out = m.outputs(raw, gates)
    with record_function("loss"):
        total, losses, counts = tr.loss(out, batch)
        if not math.isfinite(total.item()):
            raise RuntimeError("non-finite loss")
    with record_function("zero_grad"):
        tr.sparse_opt.zero_grad(set_to_none=True)
        tr.dense_opt.zero_grad(set_to_none=True)
    with record_function("backward"):
        total.backward()
        tr.sync()
    with record_function("clip"):
        if tr.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(tr.dense_params, tr.cfg.grad_clip)
    with record_function("sparse_opt"):
        tr.sparse_opt.step()
    with record_function("dense_opt"):
        tr.dense_opt.step()
    tr.global_step += 1


def timed(fn, tr, batches, n: int) -> list[float]:
    out = []
    for b in itertools.islice(itertools.cycle(batches), n):
        t0 = time.perf_counter()
        fn(tr, b)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def classify(ev, phase: str, ancestors: list[str]) -> str:
    name = ev.name
    chain = [name, *ancestors]             # innermost first
    if phase in ("sparse_opt",):
        return "sparse optimizer"
    if phase == "dense_opt":
        return "dense optimizer (Adam)"
    if phase == "clip":
        return "grad clip"
    if phase == "zero_grad":
        return "zero_grad"
    if any(w in c for c in chain for w in EMB_WORDS) or phase == "fwd.embeddings":
        return "embedding bag fwd/bwd"
    if name in GEMM or name.startswith(("mkldnn", "onednn")):
        return "GEMM"
    if not name.startswith("aten::") and not name.startswith("mkldnn"):
        return "autograd overhead"        # engine events, backward node wrappers, record_function ranges
    if phase == "loss" or (phase == "backward" and any(n in c for c in ancestors for n in LOSS_NODES)):
        return "loss"
    if name in CAST or any(c in CAST for c in ancestors):
        return "casts"
    if name in GEMM or any(c in GEMM for c in ancestors):
        return "GEMM"                     # the ops a GEMM does inside (e.g. bf16 gathers of strided inputs)
    if name in LAYOUT:
        return "layout copies"
    return "element-wise / activation"


def analyse(prof, steps: int, wall_ms: float) -> dict:
    events = prof.events()
    by_id = {id(e): e for e in events}
    buckets: dict[str, float] = defaultdict(float)
    phase_wall: dict[str, float] = defaultdict(float)
    phase_self: dict[str, float] = defaultdict(float)
    ops: dict[tuple[str, str], float] = defaultdict(float)
    gemm_detail: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name in PHASES:
            phase_wall[e.name] += e.cpu_time_total / 1e3
            continue
        anc, p = [], e.cpu_parent
        phase = None
        while p is not None:
            if p.name in PHASES:
                phase = p.name
                break
            anc.append(p.name)
            p = p.cpu_parent
        if phase is None:
            continue
        self_ms = e.self_cpu_time_total / 1e3
        cat = classify(e, phase, anc)
        buckets[cat] += self_ms
        phase_self[phase] += self_ms
        top = anc[-1] if anc else e.name
        ops[(cat, f"{phase}: {top} > {e.name}" if top != e.name else f"{phase}: {e.name}")] += self_ms
        if cat == "GEMM":
            gemm_detail[f"{phase}: {e.name} (in {top})"] += self_ms
    del by_id
    # Wall time of each phase not covered by any op's self time: the interpreter and dispatch.
    covered = sum(buckets.values())
    buckets["python / dispatch"] = max(sum(phase_wall.values()) - covered, 0.0)
    per_step = {k: buckets.get(k, 0.0) / steps for k in BUCKETS}
    total = sum(per_step.values())
    return {"per_step_ms": per_step, "total_ms": total, "wall_ms_unprofiled": wall_ms,
            "phase_ms": {p: phase_wall.get(p, 0.0) / steps for p in PHASES},
            "top_ops": sorted(((k[1], k[0], v / steps) for k, v in ops.items()), key=lambda r: -r[2])[:30],
            "gemm_ops": sorted(((k, v / steps) for k, v in gemm_detail.items()), key=lambda r: -r[1])[:15]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="profiled steps (batches cycle when fewer)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rows", type=int, default=1_000_000, help="training rows the batches come from")
    ap.add_argument("--fp32", action="store_true", help="profile fp32 instead of bf16 autocast")
    ap.add_argument("--no-esmm", action="store_true")
    ap.add_argument("--timing-steps", type=int, default=40, help="unprofiled steps timed (mirror and Trainer.step)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--order", choices=("buffer", "window"), default="buffer",
                    help="batches in the streamed shuffle-buffer order or the memory cache's whole-window order")
    a = ap.parse_args()
    bf16 = not a.fp32
    tr, batches, data_ms = build(a.rows, bf16, not a.no_esmm, a.steps + a.warmup, a.order)
    timed(step, tr, batches, a.warmup)
    # interleave: mirror / Trainer.step / mirror ..., so the check sees the same load
    mirror, real = [], []
    for _ in range(2):
        mirror += timed(step, tr, batches, a.timing_steps // 2)
        real += timed(lambda t, b: t.step(b), tr, batches, a.timing_steps // 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for b in itertools.islice(itertools.cycle(batches), a.steps):
            step(tr, b)
        prof_wall = 1e3 * (time.perf_counter() - t0) / a.steps
    res = analyse(prof, a.steps, statistics.median(mirror))
    res.update({"precision": "bf16" if bf16 else "fp32", "steps": a.steps, "batch": batches[0].size,
                "trainer_step_ms_median": statistics.median(real), "mirror_step_ms_median": statistics.median(mirror),
                "profiled_step_ms": prof_wall, "reader_ms_per_batch": data_ms,
                "samples_per_s_step_only": batches[0].size / statistics.median(real) * 1e3,
                "load_avg": os.getloadavg()[0], "threads": torch.get_num_threads(), "torch": torch.__version__})
    tot = res["total_ms"]
    lines = [f"## One training step, mtrank {res['precision']}, batch {res['batch']}, {a.steps} profiled steps\n",
             f"Trainer.step unprofiled: {res['trainer_step_ms_median']:.1f} ms median "
             f"({res['samples_per_s_step_only']:,.0f} samples/s without data loading); mirror "
             f"{res['mirror_step_ms_median']:.1f} ms; under the profiler {prof_wall:.1f} ms; the reader "
             f"{data_ms:.1f} ms per batch on its own; load average {res['load_avg']:.2f}\n",
             "| bucket | ms / step (profiled) | share |", "|---|---|---|"]
    for k in BUCKETS:
        v = res["per_step_ms"][k]
        lines.append(f"| {k} | {v:.2f} | {100 * v / tot:.1f} % |")
    lines.append(f"| **total** | {tot:.2f} | 100 % |")
    lines += ["", "| phase | ms / step (profiled, wall) |", "|---|---|"]
    lines += [f"| {p} | {v:.2f} |" for p, v in res["phase_ms"].items()]
    lines += ["", "GEMM ops (self ms / step):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in res["gemm_ops"]]
    lines += ["", "Top 30 (phase: top-level op > op, bucket, self ms / step):", ""]
    lines += [f"- {name} [{cat}]: {v:.2f}" for name, cat, v in res["top_ops"]]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bf16_profile{'' if bf16 else '-fp32'}{a.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
