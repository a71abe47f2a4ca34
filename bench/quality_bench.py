"""Quality on data whose truth is known: model AUC beside the oracle's, and ESMM's point.

The generator keeps each row's true probabilities, so (1) every task's AUC can be read against
the oracle AUC (the truth used as the score) on the same population, and (2) a conversion model
can be judged over *all* impressions against the true p(conversion | click) — which no real log
allows, since unclicked rows have no conversion label. A CVR tower trained on clicked rows only
learns the clicked population (sample selection bias); ESMM trains it through pCTR x pCVR over
every impression. Both are the same MMoE; only `esmm` differs.

    .venv/bin/python -m bench.quality_bench [--quick]
"""
from __future__ import annotations

import argparse

import numpy as np
import yaml

from bench.common import machine, write_results
from bench.mtrank_run import train_eval
from features.spec import load_spec, parse_spec
from models import ModelConfig
from pipeline.metrics import auc
from pipeline.trainer import TrainConfig


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(x.size)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def cvr_bias(pred, seed: int = 0) -> dict:
    """pCVR against the true p(conversion | click) on all, clicked and unclicked impressions."""
    p, truth, clicked = pred.outputs["p_cvr"], pred.truth["cvr"], pred.labels["ctr"] > 0
    sampled = np.random.default_rng(seed).random(truth.size) < truth  # labels we could never observe
    out = {}
    for name, rows in (("all impressions", np.ones_like(clicked)), ("clicked", clicked), ("not clicked", ~clicked)):
        pp, tt = p[rows].astype(np.float64), truth[rows].astype(np.float64)
        out[name] = {"rows": int(rows.sum()), "mean_pred": float(pp.mean()), "mean_truth": float(tt.mean()),
                     "bias": float(pp.mean() - tt.mean()), "pcoc": float(pp.mean() / tt.mean()),
                     "rmse_vs_truth": float(np.sqrt(np.mean((pp - tt) ** 2))), "spearman": spearman(pp, tt),
                     "auc_vs_sampled_truth": auc(pp, sampled[rows])}
    return out


def cvr_only_spec():
    """The default spec with every task but cvr weighted 0: with esmm off, nothing but the CVR loss
    on clicked rows trains the model — the ESMM paper's baseline, a CVR model of clicked rows."""
    raw = yaml.safe_load(load_spec().to_yaml())
    for t in raw["tasks"]:
        if t["name"] != "cvr":
            t["weight"] = 0.0
    return parse_spec(raw, "cvr-only")


MODELS = {  # label -> (esmm, spec factory)
    "ESMM": (True, load_spec),
    "plain multi-task": (False, load_spec),
    "plain CVR only": (False, cvr_only_spec),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k training rows, 50k evaluation rows")
    ap.add_argument("--bf16", action="store_true", help="train in bf16 autocast (faster, same AUCs)")
    a = ap.parse_args()
    rows, eval_rows = (200_000, 50_000) if a.quick else (1_000_000, 200_000)
    tc = TrainConfig(precision="bf16" if a.bf16 else "fp32")
    runs = {}
    for label, (esmm, make_spec) in MODELS.items():
        res, pred = train_eval(rows, eval_rows, ModelConfig(esmm=esmm), tc, spec=make_spec())
        runs[label] = {"result": res, "bias": cvr_bias(pred)}
        print(f"{label}: {res['samples_per_s']:,.0f} samples/s", flush=True)

    e, p = runs["ESMM"]["result"]["metrics"], runs["plain multi-task"]["result"]["metrics"]
    c = runs["plain CVR only"]["result"]["metrics"]
    md = ["## Quality on generated logs (truth known)\n",
          f"machine: {machine()}; MMoE 8x[256,128], towers [64], {tc.precision}; one epoch over "
          f"{runs['ESMM']['result']['rows_trained']:,} rows of day 1, evaluated on the first {eval_rows:,} rows of day 2\n",
          "### AUC per task on its population, next to the oracle (truth as the score)\n",
          "| task | population | rows | ESMM | plain multi-task | plain CVR only | oracle |", "|---|---|---|---|---|---|---|"]
    for k, m in e.items():
        if "auc" not in m:
            continue
        only = f"{c[k]['auc']:.4f}" if k in ("cvr",) else "-"
        md.append(f"| {k} | {'all impressions' if m['population'] == 'all' else 'clicked'} | {m['rows']:,} | "
                  f"{m['auc']:.4f} | {p[k]['auc']:.4f} | {only} | {m.get('oracle_auc', float('nan')):.4f} |")
    s_e, s_p = e["stay"], p["stay"]
    md += ["", f"stay (clicked rows): RMSE {s_e['rmse']:.2f}s / {s_p['rmse']:.2f}s (ESMM / plain), "
               f"R² {s_e['r2']:.4f} / {s_p['r2']:.4f}; the true mean dwell as prediction: RMSE "
               f"{s_e.get('oracle_rmse', float('nan')):.2f}s\n",
           "### pCVR scored over all impressions against the true p(conversion | click)\n",
           "| rows | model | mean pCVR | mean truth | bias | PCOC | RMSE vs truth | Spearman | AUC vs labels drawn from truth |",
           "|---|---|---|---|---|---|---|---|---|"]
    for rows_name in ("all impressions", "clicked", "not clicked"):
        for label in MODELS:
            b = runs[label]["bias"][rows_name]
            md.append(f"| {rows_name} ({b['rows']:,}) | {label} | {b['mean_pred']:.4f} | {b['mean_truth']:.4f} | "
                      f"{b['bias']:+.4f} | {b['pcoc']:.3f} | {b['rmse_vs_truth']:.4f} | {b['spearman']:.4f} | "
                      f"{b['auc_vs_sampled_truth']:.4f} |")
    be = runs["ESMM"]["bias"]["all impressions"]
    for label in ("plain CVR only", "plain multi-task"):
        bp = runs[label]["bias"]["all impressions"]
        verdict = "less" if abs(be["bias"]) < abs(bp["bias"]) else "NOT less"
        md.append(f"\nOver all impressions ESMM's pCVR is {verdict} biased than {label} "
                  f"(|bias| {abs(be['bias']):.4f} vs {abs(bp['bias']):.4f}; PCOC {be['pcoc']:.3f} vs {bp['pcoc']:.3f}).")
    write_results("quality", {"machine": machine(), "runs": runs}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
