"""Peer: torch-rechub 0.9.0 `MMOE` + `MTLTrainer` on the standard workload, one epoch.

Used as its examples use it: pandas + LabelEncoder (bench/peers/data.py), SparseFeature /
SequenceFeature (mean pooling, padding 0) / DenseFeature, `DataGenerator` dataloaders, `MTLTrainer`.
Prints one JSON line: samples/s of the training epoch (its DataLoader included), prep seconds
(Parquet -> pandas -> encoders), AUC per binary task on mtrank's populations, peak RSS.

    make bench-venv
    .mtrank/bench-venv/bin/python -m bench.peers.rechub_mmoe [--rows 1000000] [--eval-rows 200000]
"""
from __future__ import annotations

import tempfile
import time

import numpy as np
from torch.utils.data import DataLoader

from bench.common import peak_rss_mb
from bench.peers.data import BATCH, EMBED_DIM, LR, TASKS, args, emit, load, metrics, stdout_to_stderr

SETTINGS = {
    "post_click_tasks": "cvr/stay/collect/cart trained on all impressions (MTLTrainer has no loss masks)",
    "stay": "regression (MSELoss) on log1p(stay_seconds), 0 on unclicked rows",
    "task_weights": "equal (MTLTrainer averages the 5 losses; mtrank uses 1/1/0.2/0.5/0.5)",
    "batchnorm": "rechub's MLP puts BatchNorm1d after every Linear (experts, gates, towers); not optional",
    "optimizer": "Adam lr 1e-3, weight_decay 0 (MTLTrainer's default would be 1e-5)",
    "timed": "MTLTrainer.train_one_epoch: the body of fit's epoch loop (fit adds a validation pass and a torch.save)",
    "encoders": "LabelEncoder fitted on train + eval ids (as rechub's examples do); dense embedding grads",
}


def main() -> None:
    a = args(__doc__.splitlines()[0])
    with stdout_to_stderr():
        from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE
        from torch_rechub.trainers import MTLTrainer
        from torch_rechub.utils.data import DataGenerator, PredictDataset

        t0 = time.perf_counter()
        w = load(a.data, a.rows, a.eval_rows)
        features = [SparseFeature(n, w.vocab[n], embed_dim=EMBED_DIM) for n in w.categorical]
        features += [SequenceFeature(n, w.vocab[n], embed_dim=EMBED_DIM, pooling="mean", padding_idx=0,
                                     shared_with=w.shared_with.get(n)) for n in w.multi_hot]
        features += [DenseFeature(n) for n in w.numeric]
        task_types = ["regression" if k == "regression" else "classification" for _, _, k in TASKS]
        train_dl, _, _ = DataGenerator(w.x_train, w.y_train).generate_dataloader(
            x_val=w.x_eval, y_val=np.zeros((a.eval_rows, len(TASKS)), np.float32),
            x_test=w.x_eval, y_test=np.zeros((a.eval_rows, len(TASKS)), np.float32), batch_size=BATCH)
        model = MMOE(features, task_types, n_expert=8, expert_params={"dims": [256, 128]},
                     tower_params_list=[{"dims": [64]} for _ in TASKS])
        trainer = MTLTrainer(model, task_types=task_types, optimizer_params={"lr": LR, "weight_decay": 0.0},
                             n_epoch=1, device="cpu", model_path=tempfile.gettempdir())
        prep = time.perf_counter() - t0
        prep_rss = peak_rss_mb()

        t0 = time.perf_counter()
        trainer.train_one_epoch(train_dl)
        seconds = time.perf_counter() - t0

        eval_dl = DataLoader(PredictDataset(w.x_eval), batch_size=BATCH, shuffle=False)
        pred = np.asarray(trainer.predict(trainer.model, eval_dl), dtype=np.float64)
    emit("torch-rechub 0.9.0 MMOE + MTLTrainer", a.rows, seconds, prep, SETTINGS,
         {**metrics(pred, w.eval_frame), "prep_peak_rss_mb": round(prep_rss, 1)})


if __name__ == "__main__":
    main()
