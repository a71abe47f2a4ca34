"""Id embeddings that generalise: frequency admission, L2, Adagrad's starting accumulator, dropout.

On real logs with user/item ids (MovieLens-100K, Open Bandit; `bench/real_bench.py` lays them out
and writes the specs), each setting changes the id tables' options in the `mtrank init-spec` spec
(`min_count`, `l2`, `dropout` on every id feature of the data set) or the job's
`train.sparse_initial_accumulator` / `train.sparse_optimizer`, and runs `mtrank train --no-track`
with real_bench's job (MMoE 4 experts, 4 epochs, batch 1024, lr 0.002) for each seed. Reported:
AUC of every figure, mean ± sd over the seeds, against the same job without the id features and
a GBDT on the same columns (LightGBM if installed, else sklearn's HistGradientBoosting).

    nice -n 10 .venv/bin/python -m bench.id_embedding_bench [--datasets movielens] [--seeds 3]
        [--settings off,mc2,...] [--resume]

Writes bench/results/id_embedding.{json,md}; each finished run is kept in
bench/results/id_embedding.partial.json, which --resume continues from.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from bench.common import RESULTS, machine, write_results
from bench.real_bench import (DATASETS, MODEL, TRAIN, DataSet, add_mean_sd, eval_counts, make_spec,
                              run_gbdt, train_job)

# name -> (options on every id table, train overrides); "noid" trains the spec without the ids.
SETTINGS: dict[str, tuple[dict, dict]] = {
    "off": ({}, {}),
    "noid": ({}, {}),
    "mc2": ({"min_count": 2}, {}),
    "mc5": ({"min_count": 5}, {}),
    "mc10": ({"min_count": 10}, {}),
    "l2_1e-6": ({"l2": 1e-6}, {}),
    "l2_1e-5": ({"l2": 1e-5}, {}),
    "l2_1e-4": ({"l2": 1e-4}, {}),
    "acc0.1": ({}, {"sparse_initial_accumulator": 0.1}),
    "acc1": ({}, {"sparse_initial_accumulator": 1.0}),
    "drop0.1": ({"dropout": 0.1}, {}),
    "adam": ({}, {"sparse_optimizer": "adam", "sparse_lr": 0.01}),
    "mc5_drop0.1": ({"min_count": 5, "dropout": 0.1}, {}),
    "mc5_acc0.1": ({"min_count": 5}, {"sparse_initial_accumulator": 0.1}),
}
DEFAULT = "off,noid,mc2,mc5,acc0.1,l2_1e-5,drop0.1"
PARTIAL = RESULTS / "id_embedding.partial.json"


def label(name: str) -> str:
    opts, train = SETTINGS[name]
    if name == "noid":
        return "no id features"
    parts = [f"{k} {v}" for k, v in opts.items()] + [f"train.{k} {v}" for k, v in train.items()]
    return ", ".join(parts) or "ids, no option (before)"


def variant_spec(ds: DataSet, base: Path, name: str) -> Path:
    """The ids spec with the setting's options on every id feature's own table; every option not
    named is set off, whatever `mtrank init-spec` proposed (its ID_OPTIONS come from this study)."""
    opts = {"min_count": 1, "l2": 0.0, "dropout": 0.0, **SETTINGS[name][0]}
    d = yaml.safe_load(base.read_text())
    for f in d["features"]:
        if f["name"] in ds.ids:
            if f.get("table"):
                d["tables"][f["table"]].update(opts)
            else:
                f.update(opts)
    out = base.with_name(f"spec-{name}.yaml")
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def run(ds: DataSet, spec: Path, name: str, seed: int) -> dict:
    m, wall = train_job(ds, spec, ds.logs.parent / "id-bench" / f"{name}-s{seed}", name,
                        {**TRAIN, "seed": seed, **SETTINGS[name][1]})
    return {"dataset": ds.name, "setting": name, "seed": seed, "wall_s": round(wall, 1),
            "auc": {k: v["auc"] for k, v in m["tasks"].items() if "auc" in v},
            **({"id_admission": m["id_admission"]} if "id_admission" in m else {})}


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        cell = out.setdefault(r["dataset"], {}).setdefault(r["setting"], {"auc": {}, "seeds": [], "wall_s": []})
        cell["seeds"].append(r["seed"])
        cell["wall_s"].append(r["wall_s"])
        for k, v in r["auc"].items():
            cell["auc"].setdefault(k, []).append(round(v, 5))
        if "id_admission" in r:
            cell["id_admission"] = r["id_admission"]
    for sets in out.values():
        for cell in sets.values():
            add_mean_sd(cell)
    return out


def markdown(summary: dict, sets: dict[str, DataSet], info: dict) -> str:
    lines = [f"Id embedding study ({info['date']}): AUC mean ± sd over seeds {info['seeds']} (training seed; split "
             f"fixed), real_bench's job ({info['train']['epochs']} epochs). 1-min load "
             f"{info['load_min']:.1f}-{info['load_max']:.1f} on {info['machine']['cores']} cores.", ""]
    for name, cells in summary.items():
        ds = sets[name]
        figs = ds.figures
        gbdt = cells.get("gbdt")
        noid = cells.get("noid")
        lines += [f"**{name}** ({', '.join(ds.ids)} as ids). Evaluation rows / positives: "
                  + ", ".join(f"{k} {v[0]:,}/{v[1]:,}" for k, v in info["eval_counts"][name].items()), "",
                  "| setting | " + " | ".join(f"AUC {f}" for f in figs)
                  + f" | Δ{figs[0]} vs no ids | Δ{figs[0]} vs GBDT | seeds |",
                  "|---|" + "---|" * (len(figs) + 3)]
        for s, cell in cells.items():
            aucs = " | ".join(f"{cell['mean'][f]:.4f} ± {cell['sd'][f]:.4f}" if f in cell["mean"] else "–" for f in figs)
            d_noid = f"{cell['mean'][figs[0]] - noid['mean'][figs[0]]:+.4f}" if noid and s not in ("noid", "gbdt") else ""
            d_gbdt = f"{cell['mean'][figs[0]] - gbdt['mean'][figs[0]]:+.4f}" if gbdt and s != "gbdt" else ""
            what = info["labels"].get(s, s)
            lines.append(f"| {what} | {aucs} | {d_noid} | {d_gbdt} | {len(cell['seeds'])} |")
        for s, cell in cells.items():
            for t, a in cell.get("id_admission", {}).items():
                lines.append(f"\n{info['labels'].get(s, s)}: table {t}: {a['ids_rare']:,} of {a['ids_seen']:,} ids "
                             f"under min_count {a['min_count']}, {a['lookups_rare']:,} of {a['lookups']:,} training "
                             "lookups read the rare row")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="movielens")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--settings", default=DEFAULT, help=f"comma list of {', '.join(SETTINGS)} (default {DEFAULT})")
    ap.add_argument("--no-gbdt", action="store_true", help="skip the GBDT reference")
    ap.add_argument("--resume", action="store_true", help=f"keep the runs already in {PARTIAL}")
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--report-only", action="store_true", help=f"no training: report the runs in {PARTIAL}")
    a = ap.parse_args()
    settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    bad = set(settings) - set(SETTINGS)
    if bad:
        ap.error(f"unknown setting(s) {sorted(bad)}")
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    seeds = list(range(1 if a.quick else a.seeds))
    sets = {n: DATASETS[n]() for n in names}
    specs = {} if a.report_only else {n: {"ids": make_spec(ds, ids=True), "noid": make_spec(ds, ids=False)}
                                      for n, ds in sets.items()}
    runs = json.loads(PARTIAL.read_text()) if (a.resume or a.report_only) and PARTIAL.exists() else []
    done = {(r["dataset"], r["setting"], r["seed"]) for r in runs}
    loads = [r.get("load1", os.getloadavg()[0]) for r in runs] or [os.getloadavg()[0]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in ([] if a.report_only else seeds):   # seed-major: an interrupted study has every setting of the first seeds
        for n, ds in sets.items():
            plan = [*settings, *([] if a.no_gbdt else ["gbdt"])]
            for s in plan:
                if (n, s, seed) in done:
                    continue
                loads.append(os.getloadavg()[0])
                if s == "gbdt":
                    t0 = time.perf_counter()
                    auc, _, impl = run_gbdt(ds, specs[n]["ids"], seed, quick=False)
                    r = {"dataset": n, "setting": s, "seed": seed, "wall_s": round(time.perf_counter() - t0, 1),
                         "auc": auc, "impl": impl}
                else:
                    spec = specs[n]["noid"] if s == "noid" else variant_spec(ds, specs[n]["ids"], s)
                    r = run(ds, spec, s, seed)
                r["load1"] = round(loads[-1], 2)
                runs.append(r)
                PARTIAL.write_text(json.dumps(runs, indent=1))
                print(f"seed {seed} {n:9s} {s:12s} {r['wall_s']:6.1f}s  "
                      + "  ".join(f"{k} {v:.4f}" for k, v in r["auc"].items()), flush=True)
    runs = [r for r in runs if r["dataset"] in names and r["seed"] in seeds]
    summary = summarise(runs)
    impl = next((r["impl"] for r in runs if "impl" in r), None)
    labels = {s: label(s) for s in SETTINGS} | {"gbdt": impl or "GBDT"}
    info = {"date": dt.date.today().isoformat(), "seeds": seeds, "train": TRAIN, "model": MODEL,
            "machine": machine(), "load_min": min(loads), "load_max": max(loads), "labels": labels,
            "eval_counts": {n: eval_counts(ds) for n, ds in sets.items()},
            "settings": {s: {"tables": SETTINGS[s][0], "train": SETTINGS[s][1]} for s in settings}}
    write_results("id_embedding", {**info, "summary": summary, "runs": runs}, markdown(summary, sets, info))


if __name__ == "__main__":
    main()
