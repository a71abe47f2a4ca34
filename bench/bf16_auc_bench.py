"""Does bf16 autocast cost AUC? bf16 vs fp32 trainings paired by seed, on the standard workload.

One training's AUC moves with its trajectory: fp32 alone moves CVR AUC by ~0.01 between seeds,
and a bf16 run is the same seed's run perturbed by rounding, so a single bf16 - fp32 difference on
the rare post-click tasks carries noise of the same order as the 0.002 target (session 5). The
question a user has ("do I lose AUC by switching bf16 on?") is about the expected difference, so:

* each seed trains fp32 and bf16 on the same 1M rows in the same order (paired);
* every binary task and product is scored on the whole next day (1M impressions) three ways:
  `auc_head` (the first 200k rows: the figure `train_bench` prints), `auc` (all rows) and
  `expected_auc` (all rows, pairs weighted by the generator's true probabilities instead of one
  draw of labels: `pipeline.metrics.expected_auc`, no label-sampling noise);
* criterion, fixed before the runs: bf16 keeps AUC on a task when the 90 % confidence interval of
  the mean paired difference in `expected_auc` lies inside +-0.002 (two one-sided t-tests at 5 %,
  an equivalence test). Every single-seed difference is reported next to it.

`--control` adds a third arm: fp32 whose initial weights were rounded to bf16 once, then trained in
fp32 throughout: a perturbation of bf16's size that involves no bf16 arithmetic at all. Its paired
differences from fp32 show how far one rounding-sized nudge moves each task's AUC by itself.
`--model` picks the model: `default` (ModelConfig's defaults: ESMM whose post-click towers also
learn from clicked rows, the model a user trains without settings), `classic` (`esmm: true`) or
`plain` (post-click towers trained on clicked rows only; `--no-esmm` is the same), `clicked1` (the
default's clicked-row term at weight 1.0) or `demo` (the demo job's model, `jobs/default_job.yaml`).

    .venv/bin/python -m bench.bf16_auc_bench [--seeds 5] [--control] [--model default|classic|plain|clicked1|demo] [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import stats

from bench.common import machine, write_results
from bench.mtrank_run import train_eval
from mtrank.features.spec import load_spec
from mtrank.jobs.config import load_config
from mtrank.models import ModelConfig
from mtrank.pipeline.evaluate import Predictions, binary_sets
from mtrank.pipeline.metrics import auc, expected_auc
from mtrank.pipeline.trainer import TrainConfig

MARGIN = 0.002
HEAD_ROWS = 200_000
MEASURES = ("expected_auc", "auc", "auc_head")
MODELS = {"default": ModelConfig, "classic": lambda: ModelConfig(esmm=True), "plain": lambda: ModelConfig(esmm=False),
          "clicked1": lambda: ModelConfig(esmm={"tower_loss": "clicked", "tower_weight": 1.0}),
          "demo": lambda: load_config().model}


def head(pred: Predictions, n: int) -> Predictions:
    """The first `n` rows (reader order) of a prediction set."""
    cut = lambda d: {k: v[:n] for k, v in d.items()}  # noqa: E731
    return Predictions(cut(pred.outputs), cut(pred.labels), cut(pred.masks), cut(pred.truth),
                       None if pred.group is None else pred.group[:n], pred.gate_means, min(n, pred.rows))


def score(pred: Predictions, spec) -> dict[str, dict[str, float]]:
    """{task: {measure: value}} for every binary task and entire-space product."""
    out = {name: {"auc": auc(b.score, b.label), "expected_auc": expected_auc(b.score, b.oracle),
                  "oracle_auc": auc(b.oracle, b.label)}
           for name, b in binary_sets(pred, spec).items()}
    for name, b in binary_sets(head(pred, HEAD_ROWS), spec).items():
        out[name]["auc_head"] = auc(b.score, b.label)
    return out


def equivalence(diffs: list[float]) -> dict:
    d = np.asarray(diffs)
    n = d.size
    mean, sd = float(d.mean()), float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.95, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "ci90": [mean - half, mean + half], "max_abs": float(np.abs(d).max()),
            "keeps_auc": bool(n > 1 and -MARGIN < mean - half and mean + half < MARGIN)}


@torch.no_grad()
def round_init_to_bf16(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).float())


ARMS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "fp32, init rounded to bf16": ("fp32", round_init_to_bf16)}


def diff_table(by: dict, arm: str, tasks: list[str], seeds: int, summary: dict) -> list[str]:
    md = [f"| task | fp32 expected AUC (mean) | fp32 sd over seeds | {arm} - fp32 per seed | mean | 90 % CI | "
          "within +-0.002 |", "|---|---|---|---|---|---|---|"]
    for t in tasks:
        e = summary[t]
        f32 = [by[s, "fp32"][t]["expected_auc"] for s in range(seeds)]
        per = " ".join(f"{by[s, arm][t]['expected_auc'] - by[s, 'fp32'][t]['expected_auc']:+.4f}"
                       for s in range(seeds))
        sd = np.std(f32, ddof=1) if seeds > 1 else float("nan")
        md.append(f"| {t} | {np.mean(f32):.4f} | {sd:.4f} | {per} | {e['mean']:+.4f} | "
                  f"{e['ci90'][0]:+.4f} .. {e['ci90'][1]:+.4f} | {'yes' if e['keeps_auc'] else 'NO'} |")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--control", action="store_true", help="add the fp32 arm with bf16-rounded initial weights")
    ap.add_argument("--model", choices=tuple(MODELS), default="default")
    ap.add_argument("--no-esmm", action="store_true", help="the same as --model plain")
    ap.add_argument("--quick", action="store_true", help="200k training rows, 200k evaluation rows, 2 seeds")
    a = ap.parse_args()
    kind = "plain" if a.no_esmm else a.model
    rows, eval_rows, seeds = (200_000, 200_000, 2) if a.quick else (1_000_000, None, a.seeds)
    arms = [k for k in ARMS if a.control or not k.startswith("fp32,")]
    spec = load_spec()
    loads, runs = [], []
    for seed in range(seeds):
        for arm in arms:
            precision, hook = ARMS[arm]
            t0 = time.perf_counter()
            out, pred = train_eval(rows, eval_rows, MODELS[kind](),
                                   TrainConfig(precision=precision, seed=seed), spec=spec, init_hook=hook)
            runs.append({"seed": seed, "arm": arm, "samples_per_s": out["samples_per_s"],
                         "eval_rows": pred.rows, "tasks": score(pred, spec)})
            loads.append(machine()["loadavg"][0])
            print(f"seed {seed} {arm}: {out['samples_per_s']:,.0f} samples/s, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    by = {(r["seed"], r["arm"]): r["tasks"] for r in runs}
    tasks = list(runs[0]["tasks"])
    summary = {arm: {m: {t: equivalence([by[s, arm][t][m] - by[s, "fp32"][t][m] for s in range(seeds)])
                         for t in tasks} for m in MEASURES} for arm in arms if arm != "fp32"}

    model = {"default": "MMoE + ESMM, clicked-row tower term (the default model)", "classic": "MMoE + classic ESMM",
             "plain": "plain multi-task (no ESMM)", "clicked1": "MMoE + ESMM, clicked-row tower term at weight 1.0",
             "demo": "the demo job's model"}[kind]
    md = [f"## bf16 vs fp32 AUC, paired by seed (standard workload, {model})", "",
          f"machine: {machine()}; {rows:,} training rows, scored on {runs[0]['eval_rows']:,} rows of the next "
          f"day; {seeds} seeds; 1-min load average {min(loads):.2f}-{max(loads):.2f}", "",
          f"Criterion: the 90 % CI of the mean paired difference in expected AUC inside +-{MARGIN} "
          "(equivalence, two one-sided t-tests at 5 %).", ""]
    md += diff_table(by, "bf16", tasks, seeds, summary["bf16"]["expected_auc"])
    for arm in arms[2:]:
        md += ["", f"Control: {arm} (no bf16 arithmetic), same measure:", ""]
        md += diff_table(by, arm, tasks, seeds, summary[arm]["expected_auc"])
    md += ["", "bf16 - fp32 in empirical AUC (one draw of labels):", "",
           "| task | measure | per seed | mean | 90 % CI | largest abs |", "|---|---|---|---|---|---|"]
    for t in tasks:
        for m in ("auc", "auc_head"):
            e = summary["bf16"][m][t]
            per = " ".join(f"{by[s, 'bf16'][t][m] - by[s, 'fp32'][t][m]:+.4f}" for s in range(seeds))
            label = "all rows" if m == "auc" else f"first {HEAD_ROWS // 1000}k rows"
            md.append(f"| {t} | {label} | {per} | {e['mean']:+.4f} | {e['ci90'][0]:+.4f} .. {e['ci90'][1]:+.4f} | "
                      f"{e['max_abs']:.4f} |")
    name = "bf16_auc" + {"default": "", "classic": "-classic", "plain": "-plain", "clicked1": "-clicked1", "demo": "-demo"}[kind] + ("-quick" if a.quick else "")
    write_results(name, {"machine": machine(), "rows": rows, "seeds": seeds, "model": kind,
                         "model_config": MODELS[kind]().model_dump(mode="json"),
                         "runs": runs, "summary": summary}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
