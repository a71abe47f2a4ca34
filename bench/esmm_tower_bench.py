"""ESMM that keeps its towers (issue 16, point 6): plain vs classic ESMM vs ESMM + a tower term.

Classic ESMM trains a post-click task only through the entire-space product p_parent x p_child, and
its towers end up weaker than towers trained on clicked rows (bench/README.md, bf16 section); its
point is a less biased pCVR over all impressions under sample selection (quality_bench). The
variants keep the entire-space term and add, on the same task, a term on the child's own logit
(`model.esmm: {tower_loss: clicked | ips}`, pipeline/losses.py). Two measurements, each arm
trained with the same seed on the same rows in the same order:

(a) standard workload (bench/mtrank_run.py: 1M rows of day 1, seed = initial weights and batch
    order): expected AUC (pipeline.metrics.expected_auc: pairs weighted by the generator's true
    probabilities, no label noise) of every binary task on its population and every product, on
    the first `--eval-rows` rows of day 2;
(b) the selection study (quality_bench: `ImpressionConfig(selection=1.5)`, seed = generator seed):
    pCVR over all impressions against the true p(conversion | click): bias, PCOC, RMSE, Spearman
    on unclicked rows, plus the CVR tower's expected AUC on clicked rows.

    .venv/bin/python -m bench.esmm_tower_bench [--rows 1000000] [--eval-rows 1000000] [--seeds 1,2,3]
        [--arms plain,esmm,clicked,ips] [--selection 1.5] [--quick] [--name esmm_tower]
    .venv/bin/python -m bench.esmm_tower_bench --combine esmm_tower-a,esmm_tower-b [--name esmm_tower]

`--combine` merges the runs of earlier invocations (bench/results/<name>.json, same rows) into one
table: seeds or arms run as separate processes.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.common import RESULTS, machine, write_results
from bench.mtrank_run import train_eval
from bench.quality_bench import cvr_bias, selection_data
from mtrank.features.spec import load_spec
from mtrank.jobs.config import load_config
from mtrank.models.config import EsmmConfig, ModelConfig
from mtrank.pipeline.evaluate import binary_sets
from mtrank.pipeline.metrics import expected_auc
from mtrank.pipeline.trainer import TrainConfig

ARMS = {  # label -> ModelConfig.esmm
    "plain": False,
    "esmm": True,
    # weight 1.0 named: EsmmConfig's default became 0.5 with the 2026-12-01 default model
    "clicked": EsmmConfig(tower_loss="clicked", tower_weight=1.0),
    "ips": EsmmConfig(tower_loss="ips", tower_weight=1.0),
    "clicked x0.5": EsmmConfig(tower_loss="clicked", tower_weight=0.5),
    "ips x0.5": EsmmConfig(tower_loss="ips", tower_weight=0.5),
    "tower-only": EsmmConfig(tower_loss="clicked", tower_weight=1.0, tower_scope="tower"),
    "dense": EsmmConfig(tower_loss="clicked", tower_weight=1.0, tower_scope="dense"),
    "dense x0.5": EsmmConfig(tower_loss="clicked", tower_weight=0.5, tower_scope="dense"),
    **{f"id bias {s}": EsmmConfig(tower_loss="clicked", tower_weight=1.0, tower_scope="dense", id_bias=s)
       for s in (0.1, 0.2, 0.5)},
    # the demo job's setting until 2026-12-03: the id tables kept out, per-id biases
    "ids kept out": EsmmConfig(tower_loss="clicked", tower_weight=1.0, tower_scope="dense",
                               detach_tables=("user_id", "item_id"), id_bias=0.2),
    "demo": load_config().model.esmm,   # the demo job's setting (the tables it names are in its YAML)
}
LABEL = {"plain": "plain multi-task", "esmm": "classic ESMM", "clicked": "ESMM + clicked BCE",
         "ips": "ESMM + IPS", "clicked x0.5": "ESMM + 0.5 clicked BCE", "ips x0.5": "ESMM + 0.5 IPS",
         "tower-only": "ESMM + clicked BCE on the tower only",
         "dense": "ESMM + clicked BCE on the dense layers", "dense x0.5": "ESMM + 0.5 clicked BCE on the dense layers",
         **{f"id bias {s}": f"dense + private id biases x{s}" for s in (0.1, 0.2, 0.5)},
         "ids kept out": "dense, id tables kept out, per-id biases x0.2",
         "demo": "the demo job's ESMM"}


def expected_aucs(pred, spec) -> dict[str, float]:
    """Expected AUC of every binary task (own population) and entire-space product."""
    return {name: expected_auc(b.score, b.oracle) for name, b in binary_sets(pred, spec).items()
            if b.oracle is not None}


def run(arms: list[str], seeds: list[int], rows: int, eval_rows: int, selection: float,
        studies: tuple[str, ...] = ("standard", "selection")) -> dict:
    spec = load_spec()
    out = {"standard": {}, "selection": {}}
    for seed in seeds:
        for arm in arms if "standard" in studies else ():
            t0 = time.perf_counter()
            res, pred = train_eval(rows, eval_rows, ModelConfig(esmm=ARMS[arm]), TrainConfig(seed=seed, precision="fp32"), spec=spec)
            out["standard"].setdefault(str(seed), {})[arm] = {
                "expected_auc": expected_aucs(pred, spec), "auc": res["auc"], "samples_per_s": res["samples_per_s"]}
            print(f"standard seed {seed} {arm}: {time.perf_counter() - t0:.0f} s "
                  f"{ {k: round(v, 4) for k, v in out['standard'][str(seed)][arm]['expected_auc'].items()} }",
                  flush=True)
        root = selection_data(seed, selection, rows) if "selection" in studies else None
        for arm in arms if "selection" in studies else ():
            t0 = time.perf_counter()
            res, pred = train_eval(rows, eval_rows, ModelConfig(esmm=ARMS[arm]), TrainConfig(precision="fp32"), root=root, spec=spec)
            bias = cvr_bias(pred)
            out["selection"].setdefault(str(seed), {})[arm] = {
                "bias": bias, "expected_auc": expected_aucs(pred, spec), "auc": res["auc"]}
            print(f"selection seed {seed} {arm}: {time.perf_counter() - t0:.0f} s, bias over all impressions "
                  f"{bias['all impressions']['bias']:+.4f}", flush=True)
    return out


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs))


def _values(study: dict, arm: str, get, seeds: list[int]) -> tuple[list[int], list[float]]:
    """(seeds, values) where the arm ran and the figure exists (runs recovered from a log hold fewer)."""
    got = []
    for s in seeds:
        try:
            got.append((s, get(study[str(s)][arm])))
        except KeyError:
            pass
    return [s for s, _ in got], [v for _, v in got]


def _section(study: dict, rows: list[tuple[str, object, str]], arms: list[str], seeds: list[int],
             summary: dict) -> list[str]:
    md = ["| | " + " | ".join(LABEL[a] for a in arms) + " |", "|---|" + "---|" * len(arms)]
    for name, get, fmt in rows:
        cells, any_value = [], False
        for a in arms:
            ran, v = _values(study, a, get, seeds)
            if not v:
                cells.append("–")
                continue
            any_value = True
            summary.setdefault(a, {})[name] = {"seeds": ran, "per_seed": v, "mean": _mean(v)}
            cells.append(" ".join(format(x, fmt) for x in v) + f" (**{format(_mean(v), fmt)}**)"
                         + ("" if len(v) == len(seeds) else f" seed {','.join(map(str, ran))} only"))
        if any_value:
            md.append(f"| {name} | " + " | ".join(cells) + " |")
    return md


def tables(res: dict, arms: list[str], seeds: list[int]) -> tuple[list[str], dict]:
    std, sel = res["standard"], res["selection"]
    figures = list(dict.fromkeys(f for by_arm in std.values() for r in by_arm.values() for f in r["expected_auc"]))
    summary = {"standard": {}, "selection": {}}
    md = ["### (a) Standard workload: expected AUC on day 2, per seed (training seed) and mean\n"]
    md += _section(std, [(f, lambda r, f=f: r["expected_auc"][f], ".4f") for f in figures], arms, seeds,
                   summary["standard"])
    md += ["", "### (b) Selection study (`selection` 1.5): pCVR over all impressions vs the true p(conversion | click)\n"]
    md += _section(sel, [
        ("bias, all impressions", lambda r: r["bias"]["all impressions"]["bias"], "+.4f"),
        ("PCOC, all impressions", lambda r: r["bias"]["all impressions"]["pcoc"], ".3f"),
        ("RMSE vs truth, all impressions", lambda r: r["bias"]["all impressions"]["rmse_vs_truth"], ".4f"),
        ("Spearman vs truth, not clicked", lambda r: r["bias"]["not clicked"]["spearman"], ".3f"),
        ("bias, clicked rows", lambda r: r["bias"]["clicked"]["bias"], "+.4f"),
        ("cvr expected AUC, clicked rows", lambda r: r["expected_auc"]["cvr"], ".4f")], arms, seeds,
        summary["selection"])
    return md, summary


def verdict(summary: dict, arms: list[str]) -> list[str]:
    """Per variant: mean post-click expected AUC minus plain's, mean |bias| beside classic ESMM's and plain's."""
    std, sel = summary["standard"], summary["selection"]
    post = [t.name for t in load_spec().tasks if t.parent is not None]
    nan = {"mean": float("nan")}
    bias = lambda a: abs(sel.get(a, {}).get("bias, all impressions", nan)["mean"])  # noqa: E731
    out = [""]
    for a in arms:
        if a in ("plain", "esmm"):
            continue
        gaps = {f: std[a][f]["mean"] - std["plain"][f]["mean"] for f in post
                if f in std.get(a, {}) and f in std.get("plain", {})}
        out.append(f"- **{LABEL[a]}**: post-click expected AUC minus plain's (means): "
                   + ", ".join(f"{f} {g:+.4f}" for f, g in gaps.items())
                   + f"; mean |pCVR bias| over all impressions {bias(a):.4f} (classic ESMM {bias('esmm'):.4f}, "
                   f"plain {bias('plain'):.4f}).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="training rows (day 1)")
    ap.add_argument("--eval-rows", type=int, default=1_000_000, help="evaluated rows of day 2")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--arms", default="plain,esmm,clicked,ips", help=f"of {', '.join(ARMS)}")
    ap.add_argument("--selection", type=float, default=1.5)
    ap.add_argument("--quick", action="store_true", help="200k training rows, 200k evaluated, seeds 1,2")
    ap.add_argument("--studies", default="standard,selection", help="standard, selection or both")
    ap.add_argument("--name", default=None, help="result file stem (default esmm_tower, esmm_tower-quick)")
    ap.add_argument("--combine", default=None, help="comma-separated result stems of earlier runs to merge")
    a = ap.parse_args()
    if a.quick:
        a.rows, a.eval_rows, a.seeds = 200_000, 200_000, "1,2"
    t0 = time.perf_counter()
    parts = []
    if a.combine:
        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in a.combine.split(",")]
        if len({(p["rows"], p["eval_rows"], p["selection"]) for p in parts}) != 1:
            ap.error("--combine: the runs differ in rows, eval rows or selection")
        a.rows, a.eval_rows, a.selection = parts[0]["rows"], parts[0]["eval_rows"], parts[0]["selection"]
        res = {"standard": {}, "selection": {}}
        for p in parts:
            for study in res:
                for seed, by_arm in p["runs"][study].items():
                    res[study].setdefault(seed, {}).update(by_arm)
        seeds = sorted({int(s) for s in res["standard"]})
        arms = [x for x in ARMS if any(x in res[study][str(s)] for study in res for s in seeds)]
        a.seeds = ",".join(map(str, seeds))
    else:
        arms = a.arms.split(",")
        unknown = [x for x in arms if x not in ARMS]
        if unknown:
            ap.error(f"--arms: from {', '.join(ARMS)} (unknown: {unknown})")
        seeds = [int(x) for x in a.seeds.split(",")]
        res = run(arms, seeds, a.rows, a.eval_rows, a.selection, tuple(a.studies.split(",")))
    md, summary = tables(res, arms, seeds)
    head = ["## ESMM that keeps its towers\n",
            f"machine: {machine()}; MMoE 8x[256,128], towers [64], fp32, batch 4096, one epoch over the first "
            f"{a.rows:,} rows of day 1, scored on the first {a.eval_rows:,} rows of day 2; seeds {a.seeds}; "
            + (f"combined from {a.combine}" if a.combine else f"{time.perf_counter() - t0:.0f} s in all")
            + ". Cells: per seed, then the mean in bold.\n"]
    head += [f"Note ({n}): {p['note']}\n" for n, p in zip((a.combine or "").split(","), parts if a.combine else [])
             if p.get("note")]
    head.append("Arms: " + "; ".join(f"{LABEL[x]} = `esmm: {ARMS[x] if isinstance(ARMS[x], bool) else ARMS[x].model_dump()}`"
                                     for x in arms) + "\n")
    write_results(a.name or "esmm_tower" + ("-quick" if a.quick else ""),
                  {"machine": machine(), "rows": a.rows, "eval_rows": a.eval_rows, "seeds": seeds, "arms": arms,
                   "selection": a.selection, "runs": res, "summary": summary},
                  "\n".join(head + md + verdict(summary, arms)) + "\n")


if __name__ == "__main__":
    main()
