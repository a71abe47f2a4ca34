"""Peer: deepctr-torch 0.3.0 `MMOE.fit` on the standard workload, one epoch.

Used as its examples use it: pandas + LabelEncoder (bench/peers/data.py), SparseFeat /
VarLenSparseFeat (mean combiner, padding 0, shared embedding_name) / DenseFeat, `compile("adam",
losses)`, `fit(x_dict, y, batch_size, epochs=1)`, `predict`. Prints one JSON line: samples/s of the
timed `fit` (its TensorDataset + DataLoader included), prep seconds (Parquet -> pandas -> encoders),
AUC per binary task on mtrank's populations, peak RSS.

    make bench-venv
    .mtrank/bench-venv/bin/python -m bench.peers.deepctr_mmoe [--rows 1000000] [--eval-rows 200000]
"""
from __future__ import annotations

import threading
import time

import numpy as np

from bench.common import peak_rss_mb
from bench.peers.data import BATCH, EMBED_DIM, TASKS, args, emit, load, metrics, stdout_to_stderr

SETTINGS = {
    "post_click_tasks": "cvr/stay/collect/cart trained on all impressions (fit has no loss masks)",
    "stay": "regression (mse) on log1p(stay_seconds), 0 on unclicked rows",
    "task_weights": "equal (fit sums the 5 per-task losses, reduction='sum'; mtrank uses 1/1/0.2/0.5/0.5)",
    "gates": "gate_dnn_hidden_units=() -> one linear softmax gate per task (default (64,) adds a hidden layer)",
    "regularization": "l2_reg_embedding=0, l2_reg_linear=0 (defaults 1e-5 add a full-table L2 term every step)",
    "optimizer": "compile('adam') = torch Adam lr 1e-3",
    "timed": "MMOE.fit(epochs=1, verbose=1), no validation_data: includes its np.concatenate of all inputs "
             "into one float tensor, TensorDataset and DataLoader",
    "version_check": "deepctr_torch's import-time PyPI version check (requests.get in a thread) stubbed out: "
                     "no network here",
    "encoders": "LabelEncoder fitted on train + eval ids (as deepctr's examples do); dense embedding grads",
}


def _import_deepctr():
    """Import deepctr_torch without its background PyPI query (no timeout; blocks exit offline)."""
    import requests

    real_get = requests.get

    def offline(*_a, **_k):
        raise requests.ConnectionError("offline benchmark")

    requests.get = offline
    try:
        import deepctr_torch  # noqa: F401  (starts the check thread)
        for t in threading.enumerate():
            if t is not threading.main_thread():
                t.join()
    finally:
        requests.get = real_get


def main() -> None:
    a = args(__doc__.splitlines()[0])
    with stdout_to_stderr():
        _import_deepctr()
        from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
        from deepctr_torch.models.multitask import MMOE

        t0 = time.perf_counter()
        w = load(a.data, a.rows, a.eval_rows)

        def sparse(n: str) -> SparseFeat:
            return SparseFeat(n, w.vocab[n], embedding_dim=EMBED_DIM, embedding_name=w.shared_with.get(n, n))

        columns = [sparse(n) for n in w.categorical]
        columns += [VarLenSparseFeat(sparse(n), maxlen=w.maxlen[n], combiner="mean") for n in w.multi_hot]
        columns += [DenseFeat(n, 1) for n in w.numeric]
        model = MMOE(columns, num_experts=8, expert_dnn_hidden_units=(256, 128), gate_dnn_hidden_units=(),
                     tower_dnn_hidden_units=(64,), l2_reg_linear=0.0, l2_reg_embedding=0.0,
                     task_types=[k for _, _, k in TASKS], task_names=[t for t, _, _ in TASKS], device="cpu")
        model.compile("adam", loss=["mse" if k == "regression" else "binary_crossentropy" for _, _, k in TASKS])
        prep = time.perf_counter() - t0
        prep_rss = peak_rss_mb()

        t0 = time.perf_counter()
        model.fit(w.x_train, w.y_train, batch_size=BATCH, epochs=1, verbose=1)
        seconds = time.perf_counter() - t0

        pred = model.predict(w.x_eval, batch_size=BATCH)
    emit("deepctr-torch 0.3.0 MMOE.fit", a.rows, seconds, prep, SETTINGS,
         {**metrics(pred, w.eval_frame), "prep_peak_rss_mb": round(prep_rss, 1)})


if __name__ == "__main__":
    main()
