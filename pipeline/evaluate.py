"""Predict over an evaluation window and score each task on its own population.

Each figure of the spec's `OutputSchema` is judged on its population: a task on its `space` (all rows,
or its space task's positives, e.g. clicked rows for post-click tasks), an entire-space product over
its parent's population; regression tasks by RMSE / R² on their space. Where the data carries
the generator's true probabilities, the oracle AUC (truth as the score) is reported beside the
model's, so "how good" has a ceiling to be read against.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from mtrank.features.spec import FeatureSpec
from mtrank.features.outputs import OutputKind, joint_positive
from mtrank.models import MultiTaskRanker
from mtrank.pipeline.metrics import (auc, auc_ci, calibration_bins, gauc, logloss, normalized_entropy, pcoc_ci, r2,
                                     rmse, roc_points)
from mtrank.pipeline.reader import ImpressionReader


@dataclass
class Predictions:
    outputs: dict[str, np.ndarray]      # output name (the spec's OutputSchema) -> per-row values
    labels: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    group: np.ndarray | None
    gate_means: dict[str, np.ndarray]   # task -> mean softmax weight per expert
    rows: int


FORWARD_ROWS = 16_384


def model_device(model: torch.nn.Module) -> torch.device:
    """Batches go where the weights are (the CPU unless a trainer moved the model to a GPU)."""
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (no dropout) for the block, its previous mode restored after."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train(True)


def precision_autocast(device: torch.device, precision: str):
    """bf16 autocast (the bottom in bf16, towers in fp32: see MultiTaskRanker.dense) or nothing; the one
    place training, evaluation and scoring turn `precision` into a context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


FEATURIZE_ROWS = 65_536


def _featurize_chunks(featurizer, rows, chunk_rows: int):
    """(batch, seconds) per `chunk_rows` slice of `rows`: the one place rows become model input, so
    the serial and the overlapped paths cut and featurize identically.

    Rows are featurized FEATURIZE_ROWS at a time and the arrays sliced into forward batches (hashing
    is row by row, so the ids are the same): the per-call cost of building and running the polars
    query is paid once per 64k rows, not once per forward batch; in the overlapped path that is
    Python time the background thread would otherwise hold the GIL for, next to the forward."""
    from mtrank.pipeline.batch import batch_from_arrays

    piece = max(chunk_rows, FEATURIZE_ROWS // chunk_rows * chunk_rows)
    for lo in range(0, rows.num_rows, piece):
        t0 = time.perf_counter()
        arrays = featurizer.transform(rows.slice(lo, piece), with_labels=False)
        feat_s = time.perf_counter() - t0
        for start in range(0, arrays.rows, chunk_rows):
            t1 = time.perf_counter()
            batch = batch_from_arrays(arrays if arrays.rows <= chunk_rows else arrays.slice(start, start + chunk_rows))
            yield batch, feat_s + time.perf_counter() - t1
            feat_s = 0.0


def predict_batch(model, batch, device: torch.device, precision: str) -> dict[str, np.ndarray]:
    """One featurized batch through `model.predict` at `precision`, outputs as numpy: the forward of
    scoring and serving (the caller holds eval and inference mode)."""
    with precision_autocast(device, precision):
        out = model.predict(batch.to(device))
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def _add(timings: dict | None, key: str, seconds: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + seconds


def _concat(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}


@torch.inference_mode()
def predict_rows(model: MultiTaskRanker, featurizer, rows, timings: dict | None = None,
                 chunk_rows: int = FORWARD_ROWS, precision: str = "fp32") -> dict[str, np.ndarray]:
    """Predictions for raw feature rows (an Arrow table or record batch), featurized and run in
    chunks, in eval mode under inference mode; `timings` accumulates featurize_s and forward_s when
    given. `precision: bf16` runs the bottom under bf16 autocast (as `train.precision` does)."""
    parts: dict[str, list[np.ndarray]] = {}
    device = model_device(model)
    with eval_mode(model):
        for batch, feat_s in _featurize_chunks(featurizer, rows, chunk_rows):
            t1 = time.perf_counter()
            for k, v in predict_batch(model, batch, device, precision).items():
                parts.setdefault(k, []).append(v)
            _add(timings, "featurize_s", feat_s)
            _add(timings, "forward_s", time.perf_counter() - t1)
    return _concat(parts)


_DONE = object()


def overlap_pays(model: torch.nn.Module) -> bool:
    """Whether featurizing in a background thread can hide behind the forward: on a GPU, or with a
    CPU core the forward's torch threads leave free. On a CPU whose every core runs the forward,
    the extra thread preempts one of torch's workers and every operator waits at its barrier
    (measured on 2 cores: the forward slowed by more than the featurizing it hid)."""
    if model_device(model).type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def predict_frames(model: MultiTaskRanker, featurizer, frames, rows_of=lambda item: item,
                   timings: dict | None = None, chunk_rows: int = FORWARD_ROWS, precision: str = "fp32",
                   prefetch: int = 2):
    """(item, predictions of its rows) for each item of the iterable `frames`, in order: the
    streaming form of `predict_rows` (same chunks, so the same numbers bit for bit).

    One background thread pulls the items (whatever producing them costs: reading, validation) and
    featurizes their chunks, at most `prefetch` chunks ahead, while this thread runs the forward of
    the chunk before: Arrow, polars and torch release the GIL, so reading + featurizing chunk k+1
    overlaps the forward of chunk k. An exception in the background (a bad file, a bad row) is raised
    here unchanged; closing the generator early stops the thread. `timings` accumulates source_s
    (pulling items), featurize_s (both in the background), forward_s, and input_wait_s: the forward
    waiting for input, i.e. the part of source + featurize the overlap did not hide."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    shared: dict[str, float] = {}

    def put(msg) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            it = iter(frames)
            while not stop.is_set():
                t0 = time.perf_counter()
                item = next(it, _DONE)
                _add(shared, "source_s", time.perf_counter() - t0)
                if item is _DONE:
                    break
                rows = rows_of(item)
                chunks = list(range(0, rows.num_rows, chunk_rows))
                if not chunks and not put((item, None, True)):
                    return
                for i, (batch, feat_s) in enumerate(_featurize_chunks(featurizer, rows, chunk_rows)):
                    _add(shared, "featurize_s", feat_s)
                    if not put((item, batch, i == len(chunks) - 1)):
                        return
            put((_DONE, None, True))
        except BaseException as e:  # noqa: BLE001 -- handed to the consuming thread, raised there
            put((_DONE, e, True))

    worker = threading.Thread(target=produce, name="mtrank-featurize", daemon=True)
    device = model_device(model)
    worker.start()
    try:
        with eval_mode(model):   # inference mode only around each forward: it is thread state, not held across yields
            parts: dict[str, list[np.ndarray]] = {}
            while True:
                t0 = time.perf_counter()
                item, batch, last = q.get()
                t1 = time.perf_counter()
                _add(timings, "input_wait_s", t1 - t0)
                if item is _DONE:
                    if batch is not None:
                        raise batch
                    break
                if batch is not None:
                    with torch.inference_mode():
                        out = predict_batch(model, batch, device, precision)
                    for k, v in out.items():
                        parts.setdefault(k, []).append(v)
                    _add(timings, "forward_s", time.perf_counter() - t1)
                if last:
                    out, parts = _concat(parts), {}
                    yield item, out
    finally:
        stop.set()
        worker.join()
        for k, v in shared.items():
            _add(timings, k, v)


def degenerate_outputs(pred: Predictions) -> dict[str, str]:
    """Outputs that cannot rank anything: non-finite values, or one value for every row (a diverged
    model saturates every sigmoid). {output: what is wrong}."""
    bad = {}
    for name, v in pred.outputs.items():
        if v.size == 0:
            continue
        if not np.isfinite(v).all():
            bad[name] = f"{int((~np.isfinite(v)).sum()):,} non-finite values"
        elif v.size > 1 and v.min() == v.max():
            bad[name] = f"the same value {float(v[0]):.4g} for all {v.size:,} rows"
    return bad


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


@torch.inference_mode()
def predict(model: MultiTaskRanker, reader: ImpressionReader, max_rows: int | None = None,
            precision: str = "fp32") -> Predictions:
    """All outputs for the reader's rows (the first `max_rows` if given), as flat numpy arrays."""
    was_training = model.training
    model.eval()
    outs: dict[str, list] = {}
    labels: dict[str, list] = {}
    masks: dict[str, list] = {}
    truth: dict[str, list] = {}
    groups: list = []
    gate_sums: dict[str, torch.Tensor] = {}
    rows = 0
    device = model_device(model)
    ctx = precision_autocast(device, precision)
    for batch in reader.batches(0):
        if max_rows is not None and rows >= max_rows:
            break
        take = batch.size if max_rows is None else min(batch.size, max_rows - rows)
        with ctx:
            out = model(batch.to(device))
        for k, v in out.predictions.items():
            outs.setdefault(k, []).append(v[:take].float().cpu().numpy())
        for src, dst in ((batch.labels, labels), (batch.masks, masks), (batch.truth, truth)):
            for k, v in src.items():
                dst.setdefault(k, []).append(v[:take].numpy())
        if batch.group is not None:
            groups.append(batch.group[:take].numpy())
        for t, g in (out.gates or {}).items():
            s = g[:take].float().sum(0).cpu()
            gate_sums[t] = gate_sums[t] + s if t in gate_sums else s
        rows += take
    model.train(was_training)
    return Predictions({k: _cat(v) for k, v in outs.items()}, {k: _cat(v) for k, v in labels.items()},
                       {k: _cat(v) for k, v in masks.items()}, {k: _cat(v) for k, v in truth.items()},
                       _cat(groups) if groups else None,
                       {t: (s / max(rows, 1)).numpy() for t, s in gate_sums.items()}, rows)


def merge_predictions(parts: list[Predictions]) -> Predictions:
    """Ranks' predictions of their shards as one set, so that AUC is computed over every row
    (an average of per-rank AUCs is not the AUC of the day)."""
    live = [p for p in parts if p.rows] or parts[:1]
    keys = lambda attr: dict.fromkeys(k for p in live for k in getattr(p, attr))  # noqa: E731
    cat = {attr: {k: _cat([getattr(p, attr)[k] for p in live if k in getattr(p, attr)]) for k in keys(attr)}
           for attr in ("outputs", "labels", "masks", "truth")}
    rows = sum(p.rows for p in live)
    gates = {t: sum(p.gate_means[t] * p.rows for p in live if t in p.gate_means) / max(rows, 1)
             for t in keys("gate_means")}
    groups = [p.group for p in live if p.group is not None]
    return Predictions(cat["outputs"], cat["labels"], cat["masks"], cat["truth"],
                       _cat(groups) if groups else None, gates, rows)


def _binary(score: np.ndarray, y: np.ndarray, oracle: np.ndarray | None, group: np.ndarray | None) -> dict:
    empty = score.size == 0
    m = {"rows": int(y.size), "positives": int((y > 0).sum()), "auc": auc(score, y)}
    m["auc_lo"], m["auc_hi"] = auc_ci(score, y)    # 95 % DeLong interval: is a change beyond the day's noise?
    m |= {"logloss": float("nan") if empty else logloss(score, y),
          "ne": float("nan") if empty else normalized_entropy(score, y),
          "mean_pred": float("nan") if empty else float(score.mean()),
          "observed_rate": float("nan") if empty else float((y > 0).mean())}
    m["pcoc"] = m["mean_pred"] / m["observed_rate"] if m["observed_rate"] else float("nan")
    m["pcoc_lo"], m["pcoc_hi"] = pcoc_ci(score, y)   # the day's own noise: is |PCOC - 1| beyond it?
    if group is not None:
        m["gauc"], m["gauc_groups"] = gauc(score, y, group)
    if oracle is not None:
        m["oracle_auc"] = auc(oracle, y)
        if group is not None:
            m["oracle_gauc"] = gauc(oracle, y, group)[0]
    return m


@dataclass
class BinarySet:
    """One binary figure's rows: a task on its own population, or a product on its parent's."""

    name: str
    population: str
    score: np.ndarray
    label: np.ndarray
    oracle: np.ndarray | None
    group: np.ndarray | None


def binary_sets(pred: Predictions, spec: FeatureSpec) -> dict[str, BinarySet]:
    """Every binary figure of the spec's outputs (a task on its own population, a product on its
    parent's), keyed by figure name, in spec order; products a model did not output are left out."""
    out: dict[str, BinarySet] = {}
    for f in spec.outputs.binary:
        if f.name not in pred.outputs:
            continue
        # a task's rows are its space's; a product's are its parent's (targets[0])
        mask = pred.masks[f.task if f.kind is OutputKind.PROBABILITY else f.targets[0]]
        label = joint_positive(pred.labels, f.targets).astype(np.int8)
        truth = None
        if all(t in pred.truth for t in f.targets):
            truth = np.prod([pred.truth[t] for t in f.targets], axis=0)
        out[f.figure] = BinarySet(f.figure, f.population, pred.outputs[f.name][mask], label[mask],
                                  None if truth is None else truth[mask],
                                  None if pred.group is None else pred.group[mask])
    return out


def score_histogram(score: np.ndarray, label: np.ndarray, bins: int = 50) -> dict[str, list]:
    """Counts of all rows, positives and negatives on shared bins over [0, ~99.9th percentile]:
    a rare task's scores sit far below 0.1, where bins over [0, 1] would all fall into the first.
    The last bin also holds the few rows above the range, so every row is counted."""
    s = np.asarray(score, np.float64)
    s = s[np.isfinite(s)]
    y = np.asarray(label)[np.isfinite(np.asarray(score, np.float64))] > 0
    hi = 1.0
    if s.size:
        hi = float(min(1.0, max(np.quantile(s, 0.999) * 1.05, s.min() + 1e-6, 1e-4)))
    edges = np.linspace(0.0, hi, bins + 1)
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    pos = np.bincount(idx[y], minlength=bins)
    neg = np.bincount(idx[~y], minlength=bins)
    return {"counts": (pos + neg).tolist(), "positives": pos.tolist(), "negatives": neg.tolist(),
            "edges": edges.tolist()}


def task_curves(pred: Predictions, spec: FeatureSpec, points: int = 200) -> dict[str, dict]:
    """ROC points, reliability bins and a prediction histogram (positives / negatives) per binary
    task/product (for plots)."""
    curves = {}
    for name, b in binary_sets(pred, spec).items():
        curves[name] = {"roc": roc_points(b.score, b.label, points),
                        "calibration": calibration_bins(b.score, b.label),
                        "histogram": score_histogram(b.score, b.label)}
    return curves


def task_metrics(pred: Predictions, spec: FeatureSpec) -> dict[str, dict]:
    """{figure: metrics}: one entry per task on its population, plus one per entire-space product."""
    sets = binary_sets(pred, spec)
    res: dict[str, dict] = {}
    for f in spec.outputs:
        if f.binary:
            if f.figure in sets:
                b = sets[f.figure]
                res[f.figure] = {"population": b.population, **_binary(b.score, b.label, b.oracle, b.group)}
            continue
        t = spec.task_by_name[f.task]
        pop = pred.masks[t.name]
        y, p = pred.labels[t.name][pop], pred.outputs[f.name][pop]
        m = {"population": t.space, "rows": int(y.size), "rmse": rmse(p, y), "r2": r2(p, y)}
        if t.loss == "mse_log1p":
            m["rmse_log1p"] = rmse(np.log1p(p), np.log1p(y))
        if t.name in pred.truth:
            m["oracle_rmse"] = rmse(pred.truth[t.name][pop], y)
        res[t.name] = m
    return res
