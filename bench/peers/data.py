"""Shared plumbing for the peer runners: the standard workload read the way peers' users read it.

Runs in the bench venv (pandas, pyarrow, scikit-learn, pyyaml; no mtrank imports), so the cached
Parquet is read directly; if it is missing it is generated with the repo's generator in the main
venv (`$MTRANK_PYTHON`, default .venv/bin/python).

Preprocessing follows the peers' examples: a pandas frame, one sklearn LabelEncoder per sparse
column fitted on train + eval values (as their examples fit on the whole data set), index 0 kept
for padding, multi-hot lists padded to the longest training list; fields that share an embedding
table in features/default_spec.yaml (category_id, user_recent_categories) share one encoder.
Numeric columns: the spec's fill -> clip -> log1p -> standardise (statistics from the training rows).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import LabelEncoder

from bench.common import CACHE, peak_rss_mb

ROOT = CACHE / "std-1000000"
TRAIN_DAY, EVAL_DAY = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
SPEC = Path(__file__).resolve().parents[2] / "features" / "default_spec.yaml"
# (task, label column, kind); stay is regressed on log1p(seconds) like mtrank's mse_log1p.
TASKS = [("ctr", "click", "binary"), ("cvr", "conversion", "binary"), ("stay", "stay_seconds", "regression"),
         ("collect", "collect", "binary"), ("cart", "cart", "binary")]
TRUTH = {"ctr": "true_p_click", "cvr": "true_p_conversion", "collect": "true_p_collect", "cart": "true_p_cart"}
EMBED_DIM, BATCH, LR = 16, 4096, 1e-3


def args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rows", type=int, default=1_000_000, help="training rows: the first N of day 1")
    p.add_argument("--eval-rows", type=int, default=200_000, help="evaluation rows: the first N of day 2")
    p.add_argument("--data", default=str(ROOT), help="root of the dt=YYYY-MM-DD/ Parquet folders")
    return p.parse_args()


def _day_file(root: str, day: dt.date) -> Path:
    return Path(root) / f"dt={day:%Y-%m-%d}" / "part-00000.parquet"


def ensure_data(root: str) -> None:
    """Generate the two standard days with the repo's generator (main venv) unless already there."""
    if _day_file(root, TRAIN_DAY).exists() and _day_file(root, EVAL_DAY).exists():
        return
    py = os.environ.get("MTRANK_PYTHON", ".venv/bin/python")
    code = ("import datetime, pathlib\n"
            "from pipeline.synthetic.impressions import ImpressionConfig, generate_impressions\n"
            f"generate_impressions({root!r}, ImpressionConfig(seed=1, start=datetime.date(2026, 11, 1), days=2,"
            " rows_per_day=1_000_000), progress=False)\n"
            f"pathlib.Path({root!r}, '_done_2').touch()\n")
    subprocess.run([py, "-c", code], check=True, stdout=sys.stderr)


def read_rows(path: Path, n: int, columns: list[str]) -> pd.DataFrame:
    """The first n rows of one Parquet file as a pandas frame (reads only the row groups needed)."""
    batches, got = [], 0
    for rb in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=columns):
        batches.append(rb)
        got += rb.num_rows
        if got >= n:
            break
    return pa.Table.from_batches(batches).slice(0, n).to_pandas()


@dataclass
class Workload:
    """Encoded inputs for both splits, in the layout peers' APIs take (a dict of numpy columns)."""
    categorical: list[str]
    multi_hot: list[str]
    numeric: list[str]
    vocab: dict[str, int]             # feature -> embedding rows (index 0 reserved for padding)
    shared_with: dict[str, str]       # feature -> feature whose embedding table it uses
    maxlen: dict[str, int]
    x_train: dict[str, np.ndarray]
    x_eval: dict[str, np.ndarray]
    y_train: np.ndarray               # [rows, 5] float32, columns in TASKS order
    eval_frame: pd.DataFrame          # eval labels and ground truth


def _values(col: pd.Series, multi_hot: bool, as_str: bool) -> np.ndarray:
    """A column's ids, list elements flattened row by row."""
    if multi_hot:
        col = col.explode().dropna()
    return col.astype(str).to_numpy() if as_str else col.to_numpy()


def _pad(lists: pd.Series, codes: np.ndarray, maxlen: int) -> np.ndarray:
    """Post-padded [rows, maxlen] int64 matrix from flattened codes (0 = padding)."""
    lengths = lists.map(len).to_numpy()
    starts = np.cumsum(lengths) - lengths
    out = np.zeros((len(lists), maxlen), np.int64)
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(len(codes)) - np.repeat(starts, lengths)
    keep = cols < maxlen
    out[rows[keep], cols[keep]] = codes[keep]
    return out


def load(root: str, rows: int, eval_rows: int) -> Workload:
    spec = yaml.safe_load(SPEC.read_text())
    feats = spec["features"]
    categorical = [f["name"] for f in feats if f["kind"] == "categorical"]
    multi_hot = [f["name"] for f in feats if f["kind"] == "multi_hot"]
    numeric = [f for f in feats if f["kind"] == "numeric"]
    labels = [t[1] for t in TASKS]
    cols = categorical + multi_hot + [f["name"] for f in numeric] + labels
    ensure_data(root)
    train = read_rows(_day_file(root, TRAIN_DAY), rows, cols)
    test = read_rows(_day_file(root, EVAL_DAY), eval_rows, cols + list(TRUTH.values()))

    # One encoder per embedding table: a field with `table: X` shares it with the other X fields.
    tables: dict[str, list[str]] = {}
    for f in feats:
        if f["kind"] in ("categorical", "multi_hot"):
            tables.setdefault(f.get("table", f["name"]), []).append(f["name"])
    vocab, shared_with, x_train, x_eval, maxlen = {}, {}, {}, {}, {}
    for fields in tables.values():
        as_str = len(fields) > 1      # shared table: category_id (int) meets list elements (str)
        enc = LabelEncoder().fit(np.concatenate(
            [_values(df[n], n in multi_hot, as_str) for df in (train, test) for n in fields]))
        for n in fields:
            vocab[n] = len(enc.classes_) + 1
            if n != fields[0]:
                shared_with[n] = fields[0]
            if n in multi_hot:
                maxlen[n] = max(int(train[n].map(len).max()), 1)
            for df, out in ((train, x_train), (test, x_eval)):
                codes = enc.transform(_values(df[n], n in multi_hot, as_str)) + 1
                out[n] = _pad(df[n], codes, maxlen[n]) if n in multi_hot else codes

    for f in numeric:
        n, lo_hi = f["name"], f.get("clip")
        cols_ = []
        for df in (train, test):
            v = df[n].fillna(f.get("fill", 0.0)).to_numpy(np.float64)
            if lo_hi:
                v = np.clip(v, *lo_hi)
            cols_.append(np.log1p(v) if f.get("log1p") else v)
        mean, std = (cols_[0].mean(), cols_[0].std() or 1.0) if f.get("standardize") else (0.0, 1.0)
        x_train[n], x_eval[n] = (((c - mean) / std).astype(np.float32) for c in cols_)

    y = np.stack([np.log1p(train[c].to_numpy(np.float32)) if k == "regression" else train[c].to_numpy(np.float32)
                  for _, c, k in TASKS], axis=1)
    return Workload(categorical, multi_hot, [f["name"] for f in numeric], vocab, shared_with, maxlen,
                    x_train, x_eval, y, test[labels + list(TRUTH.values())].reset_index(drop=True))


def metrics(pred: np.ndarray, ev: pd.DataFrame) -> dict:
    """AUC on mtrank's populations: ctr over all rows, post-click tasks over clicked rows.

    pred: [rows, 5] in TASKS order (probabilities for binary tasks, log1p seconds for stay).
    """
    clicked = ev["click"].to_numpy() == 1
    auc, oracle = {}, {}
    for i, (task, label, kind) in enumerate(TASKS):
        if kind != "binary":
            continue
        rows = slice(None) if task == "ctr" else clicked
        y = ev[label].to_numpy()[rows]
        auc[task] = round(float(roc_auc_score(y, pred[rows, i])), 5)
        oracle[task] = round(float(roc_auc_score(y, ev[TRUTH[task]].to_numpy()[rows])), 5)
    stay = [i for i, t in enumerate(TASKS) if t[0] == "stay"][0]
    err = pred[clicked, stay] - np.log1p(ev["stay_seconds"].to_numpy()[clicked])
    return {"auc": auc, "oracle_auc": oracle, "stay_rmse_log1p": round(float(np.sqrt(np.mean(err ** 2))), 5),
            "eval_rows": len(ev), "eval_clicked_rows": int(clicked.sum())}


@contextlib.contextmanager
def stdout_to_stderr():
    """Peers print progress on stdout; keep stdout for the one JSON line."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit(name: str, rows: int, seconds: float, prep_seconds: float, settings: dict, extra: dict) -> None:
    import torch

    out = {"name": name, "rows_trained": rows, "seconds": round(seconds, 3),
           "samples_per_s": round(rows / seconds, 1), "prep_seconds": round(prep_seconds, 3),
           **extra, "peak_rss_mb": round(peak_rss_mb(), 1),
           "settings": {"torch": torch.__version__, "threads": torch.get_num_threads(), **settings}}
    print(json.dumps(out), file=sys.__stdout__, flush=True)
