"""mtrank's side of the standard workload (BENCHMARKS.md): train on day 1, evaluate on day 2.

Used by the speed benchmark (as a child process, one JSON line, so peak RSS is its own) and by
the quality benchmark (in-process, predictions kept). Data loading is inside the timed epoch:
the reader streams Parquet -> validate -> hash -> shuffle -> Batch while training.

    .venv/bin/python -m bench.mtrank_run [--rows N] [--eval-rows N] [--bf16 | --precision auto|fp32|bf16]
                                         [--bottom mmoe] [--esmm default|classic|none] [--no-esmm] [--seed S]
                                         [--epochs N] [--feature-cache auto|memory|disk|off] [--data-workers N]

`--esmm default` (the default) trains ModelConfig's ESMM (post-click towers with a clicked-row term),
`classic` the original ESMM (`esmm: true`, the standard workload's figures before 2026-12), `none`
(= `--no-esmm`) plain towers on their own populations.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time

import torch

from bench.common import CACHE, peak_rss_mb
from mtrank.features.featurize import Featurizer
from mtrank.features.spec import FeatureSpec, load_spec
from mtrank.jobs.process_memory import keep_freed_memory
from mtrank.models import ModelConfig
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.feature_cache import FeatureCache
from mtrank.pipeline.evaluate import Predictions, predict, task_metrics
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from mtrank.pipeline.trainer import TrainConfig, Trainer, build_model

ROOT = CACHE / "std-1000000"
TRAIN_DAY, EVAL_DAY = dt.date(2026, 11, 1), dt.date(2026, 11, 2)


def ensure_data(root=ROOT) -> str:
    from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

    days = [root / f"dt={d}" / "part-00000.parquet" for d in (TRAIN_DAY, EVAL_DAY)]
    if not all(p.exists() for p in days):
        generate_impressions(root, ImpressionConfig(seed=1, start=TRAIN_DAY, days=2, rows_per_day=1_000_000),
                             progress=False)
    return str(root)


def first_rows(window, rows: int | None):
    """The window cut to its first `rows` rows, at row-group granularity (file order)."""
    if rows is None:
        return window
    keep, n = [], 0
    for g in window.row_groups:
        if n >= rows:
            break
        keep.append(g)
        n += g.rows
    window.row_groups = keep
    return window


def train_eval(rows: int | None, eval_rows: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
               root: str | None = None, spec: FeatureSpec | None = None,
               init_hook=None) -> tuple[dict, Predictions]:
    """`init_hook(model)`: changes the initial weights before training (a control experiment)."""
    spec = spec or load_spec()
    root = root or ensure_data()
    window = first_rows(open_window(root, spec, TRAIN_DAY, TRAIN_DAY), rows)
    t0 = time.perf_counter()
    stats = fit_numeric_stats(ImpressionReader(window, spec, progress=False))
    prep = time.perf_counter() - t0
    fz = Featurizer(spec, stats)
    model = build_model(spec, model_cfg, train_cfg.seed, stats)
    if init_hook is not None:
        init_hook(model)
    trainer = Trainer(model, spec, train_cfg)
    cache = FeatureCache(train_cfg.feature_cache, train_cfg.feature_cache_mb << 20, CACHE / "feature-cache")
    reader = ImpressionReader(window, spec, fz, batch_size=train_cfg.batch_size, shuffle=train_cfg.shuffle,
                              shuffle_buffer=train_cfg.shuffle_buffer, seed=train_cfg.seed, progress=False,
                              cache=cache, workers=train_cfg.data_workers)
    t0 = time.perf_counter()
    result = trainer.fit(reader, progress=False)
    seconds = time.perf_counter() - t0
    ev = ImpressionReader(open_window(root, spec, EVAL_DAY, EVAL_DAY), spec, fz, batch_size=16_384,
                          with_eval=True, progress=False)
    pred = predict(model, ev, eval_rows)  # fp32 inference: bf16 logits would tie many rows
    metrics = task_metrics(pred, spec)
    out = {"rows_trained": result.rows_trained, "seconds": round(seconds, 3),
           "samples_per_s": round(result.rows_trained / seconds, 1), "prep_seconds": round(prep, 3),
           "auc": {k: round(m["auc"], 6) for k, m in metrics.items() if "auc" in m},   # tables print 4 decimals
           "oracle_auc": {k: round(m["oracle_auc"], 4) for k, m in metrics.items() if "oracle_auc" in m},
           "metrics": metrics, "accounting": result.accounting.as_dict(), "epochs": result.epochs}
    return out, pred


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--eval-rows", type=int, default=200_000)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--bottom", default="mmoe")
    p.add_argument("--no-esmm", action="store_true", help="the same as --esmm none")
    p.add_argument("--esmm", choices=("default", "classic", "none"), default="default")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="train.precision "
                   "(default fp32; --bf16 is --precision bf16)")
    p.add_argument("--sparse-optimizer", default="rowwise_adagrad")
    p.add_argument("--sparse-lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--feature-cache", default="off", choices=["auto", "memory", "disk", "off"],
                   help="train.feature_cache (default off: one epoch gains nothing from it)")
    p.add_argument("--feature-cache-mb", type=int, default=2048, help="train.feature_cache_mb")
    p.add_argument("--data-workers", type=int, default=1, help="train.data_workers")
    a = p.parse_args()
    keep_freed_memory()   # as the `mtrank` CLI does at start (MTRANK_KEEP_FREED_MEMORY=0: glibc's default)
    esmm = "none" if a.no_esmm else a.esmm
    mc = ModelConfig(bottom=a.bottom, **({} if esmm == "default" else {"esmm": esmm == "classic"}))
    tc = TrainConfig(precision=a.precision or ("bf16" if a.bf16 else "fp32"), sparse_optimizer=a.sparse_optimizer, seed=a.seed,
                     epochs=a.epochs, feature_cache=a.feature_cache,
                     feature_cache_mb=a.feature_cache_mb, data_workers=a.data_workers,
                     **({"sparse_lr": a.sparse_lr} if a.sparse_lr else {}))
    out, _ = train_eval(a.rows, a.eval_rows, mc, tc)
    out.pop("metrics")
    out["epoch_samples_per_s"] = [round(e["samples_per_s"], 1) for e in out.pop("epochs")]
    name = f"mtrank {a.bottom}{'' if esmm == 'none' else '+esmm'}{'-classic' if esmm == 'classic' else ''} ({tc.precision})"
    print(json.dumps({"name": name, **out, "peak_rss_mb": round(peak_rss_mb(), 1),
                      "settings": {"threads": torch.get_num_threads(), "model": mc.model_dump(mode="json"),
                                   "train": tc.model_dump(mode="json")}}), flush=True)


if __name__ == "__main__":
    main()
