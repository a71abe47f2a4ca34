"""Peer: torch-rechub 0.9.0 `MMOE` + `MTLTrainer` on one of bench/real_bench.py's data sets.

Runs in the bench venv (no mtrank imports). Reads the day partitions and the FeatureSpec mtrank
inferred for them, so it sees the same columns and the same split. Preprocessing as rechub's
examples: one LabelEncoder per categorical / multi-hot column fitted on train + eval values (ids
seen only in the evaluation period get an embedding row that training never touched), index 0 kept
for padding; numerics: the spec's fill -> clip -> log1p -> standardise (training statistics).
MTLTrainer has no loss masks, so a child task (love) is trained on all rows (entire space).

Writes the evaluation predictions ([rows, tasks] float64, the spec's task order) to --out and
prints one JSON line (seconds, settings).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from sklearn.preprocessing import LabelEncoder

from bench.peers.data import stdout_to_stderr


def read_days(logs: Path, days: list[str], columns: list[str]) -> pd.DataFrame:
    return pd.concat([pq.read_table(logs / f"dt={d}" / "part-0.parquet", columns=columns).to_pandas()
                      for d in days], ignore_index=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logs", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--train-days", required=True, help="comma-separated dt values")
    p.add_argument("--eval-day", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--expert-dims", default="64,32")
    p.add_argument("--tower-dims", default="16")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    with stdout_to_stderr():
        import torch
        from torch.utils.data import DataLoader
        from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE
        from torch_rechub.trainers import MTLTrainer
        from torch_rechub.utils.data import DataGenerator, PredictDataset

        spec = yaml.safe_load(Path(a.spec).read_text())
        dim = spec.get("embedding_dim", 16)
        feats = spec["features"]
        tasks = [t for t in spec["tasks"] if t["type"] == "binary"]
        cols = [f["name"] for f in feats] + [t["label"] for t in tasks]
        logs = Path(a.logs)
        train = read_days(logs, a.train_days.split(","), cols)
        test = read_days(logs, [a.eval_day], cols)

        t0 = time.perf_counter()
        x_train, x_eval, features = {}, {}, []
        for f in feats:
            n = f["name"]
            if f["kind"] == "categorical":
                enc = LabelEncoder().fit(pd.concat([train[n], test[n]]).astype(str))
                x_train[n] = enc.transform(train[n].astype(str)) + 1
                x_eval[n] = enc.transform(test[n].astype(str)) + 1
                features.append(SparseFeature(n, len(enc.classes_) + 1, embed_dim=dim))
            elif f["kind"] == "multi_hot":
                allv = pd.concat([train[n], test[n]]).explode().dropna().astype(str)
                enc = LabelEncoder().fit(allv)
                maxlen = max(int(train[n].map(len).max()), 1)
                for df, out in ((train, x_train), (test, x_eval)):
                    m = np.zeros((len(df), maxlen), np.int64)
                    for i, lst in enumerate(df[n]):
                        if len(lst):
                            codes = enc.transform(np.asarray(lst, dtype=str)[:maxlen]) + 1
                            m[i, :len(codes)] = codes
                    out[n] = m
                features.append(SequenceFeature(n, len(enc.classes_) + 1, embed_dim=dim, pooling="mean",
                                                padding_idx=0))
            else:
                vs = []
                for df in (train, test):
                    v = df[n].fillna(f.get("fill", 0.0)).to_numpy(np.float64)
                    if f.get("clip"):
                        v = np.clip(v, *f["clip"])
                    vs.append(np.log1p(v) if f.get("log1p") else v)
                mean, std = (vs[0].mean(), vs[0].std() or 1.0) if f.get("standardize") else (0.0, 1.0)
                x_train[n], x_eval[n] = (((v - mean) / std).astype(np.float32) for v in vs)
                features.append(DenseFeature(n))
        y = np.stack([train[t["label"]].to_numpy(np.float32) for t in tasks], axis=1)
        prep = time.perf_counter() - t0

        torch.manual_seed(a.seed)
        np.random.seed(a.seed)
        task_types = ["classification"] * len(tasks)
        zeros = np.zeros((len(test), len(tasks)), np.float32)
        train_dl, _, _ = DataGenerator(x_train, y).generate_dataloader(
            x_val=x_eval, y_val=zeros, x_test=x_eval, y_test=zeros, batch_size=a.batch)
        ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
        model = MMOE(features, task_types, n_expert=a.experts, expert_params={"dims": ints(a.expert_dims)},
                     tower_params_list=[{"dims": ints(a.tower_dims)} for _ in tasks])
        trainer = MTLTrainer(model, task_types=task_types, optimizer_params={"lr": a.lr, "weight_decay": 0.0},
                             n_epoch=a.epochs, device="cpu", model_path=tempfile.gettempdir())
        t0 = time.perf_counter()
        for _ in range(a.epochs):
            trainer.train_one_epoch(train_dl)
        seconds = time.perf_counter() - t0
        eval_dl = DataLoader(PredictDataset(x_eval), batch_size=4096, shuffle=False)
        pred = np.asarray(trainer.predict(trainer.model, eval_dl), dtype=np.float64).reshape(len(test), -1)
    np.save(a.out, pred)
    print(json.dumps({"seconds": round(seconds, 3), "prep_seconds": round(prep, 3), "tasks": [t["name"] for t in tasks],
                      "settings": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "batchnorm": "rechub's MLP puts BatchNorm1d after every Linear",
                                   "loss": "mean of the task BCEs, child tasks on all rows"}}),
          file=sys.__stdout__, flush=True)


if __name__ == "__main__":
    main()
