"""Offline search of the fusion factors' offsets and exponents on logged requests: pure numpy.

A logged day is laid out once as a padded [requests, max_len] matrix. One trial fuses every row with
`fuse` (the scorer's own formula, rule_weight = 1), sorts each request by fused score (one argsort
along axis 1) and gathers two offline objectives over the top K:

- value@K: sum of value × label over the top K (e.g. price × purchase = expected GMV), averaged over
  all requests; which column and task come from the job's `score.tune`;
- NDCG@K over graded actions: a row's gain is the highest gain among the tasks it is positive on
  (`score.tune.gains`), DCG = sum gain / log2(rank + 1), divided by the DCG of the request's ideal
  order; requests with no positive (ideal DCG 0) are left out of the mean (their count is reported).

The free parameters are `<factor>.offset` / `<factor>.exponent` for every factor with a `search`
range. Requests are split deterministically into a tuning half and a holdout half by an xxhash64 of
the request id (`split_requests`); the search sees the tuning half only, and its claim is the holdout.
No files, no MLflow: callers pass numpy arrays.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import polars_hash  # noqa: F401  (registers the `nchash` expression namespace)

from mtrank.features.outputs import OutputKind, OutputSchema
from mtrank.pipeline.scoring.config import TuneConfig
from mtrank.pipeline.scoring.fusion import FusionPlan, ScoringError, fuse

OBJECTIVES = ("value", "ndcg")
SPLIT_SEED = 0x6D7472616E6B  # "mtrank": fixed, so every run splits a day the same way


def split_requests(request_ids: np.ndarray, seed: int = SPLIT_SEED) -> np.ndarray:
    """Per row: True = holdout, False = tuning. xxhash64 of the id's text (integers in decimal),
    so the split is the same on every machine and run, and all rows of a request land together."""
    s = pl.Series("r", request_ids)
    if s.dtype != pl.String:
        s = s.cast(pl.String)
    h = s.to_frame().select(pl.col("r").nchash.xxhash64(seed=seed).fill_null(0)).to_series().to_numpy()
    return (h & 1).astype(bool)


def default_gains(schema: OutputSchema) -> dict[str, float]:
    """1 for a binary task on all rows (e.g. a click), 2 for a task on another's positives (after it)."""
    return {f.task: 1.0 if f.population == "all" else 2.0 for f in schema.fields
            if f.kind is OutputKind.PROBABILITY}


def graded_gain(labels: Mapping[str, np.ndarray], gains: Mapping[str, float]) -> np.ndarray:
    """Per row: the highest gain among the tasks whose label is positive; 0 when none is."""
    n = len(next(iter(labels.values()))) if labels else 0
    g = np.zeros(n)
    for task, gain in gains.items():
        g = np.where(np.asarray(labels[task]) > 0, np.maximum(g, gain), g)
    return g


def check_tune(cfg: TuneConfig, schema: OutputSchema) -> dict[str, float]:
    """The gains to use, every task name checked against the model's binary tasks."""
    binary = {f.task for f in schema.fields if f.kind is OutputKind.PROBABILITY}
    for where, names in (("score.tune.gains", cfg.gains or {}), ("score.tune.value_task",
                                                                 [cfg.value_task] if cfg.value_task else [])):
        for t in names:
            if t not in binary:
                raise ScoringError(f"{where}: {t!r} is not a binary task of the model; its binary tasks are: "
                                 f"{', '.join(sorted(binary))}")
    return dict(cfg.gains) if cfg.gains else default_gains(schema)


@dataclass(frozen=True)
class RequestMatrix:
    """Rows of logged requests, grouped by request; within a request by item id when `item_ids` are
    given (so equal fused scores rank as the scorer ranks them: `rerank` breaks ties by item), else
    in logged order.

    `outputs`/`columns` are flat (what `fuse` reads); `pos` puts flat row i at [pos // L, pos % L] of
    the padded [requests, L] matrices `value` (value × label) and `gain` (graded action).
    """
    outputs: dict[str, np.ndarray]
    columns: dict[str, np.ndarray]
    pos: np.ndarray
    value: np.ndarray
    gain: np.ndarray
    ideal_dcg: np.ndarray      # [requests] at k_max
    k_max: int
    rows: int
    requests: int
    width: int

    @classmethod
    def build(cls, request_ids: np.ndarray, outputs: Mapping[str, np.ndarray], columns: Mapping[str, np.ndarray],
              value: np.ndarray, gain: np.ndarray, k: int, item_ids: np.ndarray | None = None) -> "RequestMatrix":
        """`value`: per row value × label (0 where the value objective is not configured); `gain`: per
        row graded gain (`graded_gain`)."""
        n = len(request_ids)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        for name, arr in {"value": value, "gain": gain, **columns, **outputs}.items():
            if len(arr) != n:
                raise ValueError(f"{name}: {len(arr)} values for {n} rows")
        _, code = np.unique(np.asarray(request_ids), return_inverse=True)
        code = code.ravel()
        if item_ids is None:
            order = np.argsort(code, kind="stable")   # grouped, logged order kept inside a request
        else:
            if len(item_ids) != n:
                raise ValueError(f"item_ids: {len(item_ids)} values for {n} rows")
            _, item = np.unique(np.asarray(item_ids), return_inverse=True)
            order = np.lexsort((item.ravel(), code))   # grouped, item ids ascending inside a request
        code = code[order]
        counts = np.bincount(code) if n else np.zeros(0, np.int64)
        r = len(counts)
        width = int(counts.max()) if r else 1
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if r else np.zeros(0, np.int64)
        col = np.arange(n) - starts[code]
        pos = code * width + col
        val = np.zeros(r * width)
        v = np.asarray(value, dtype=np.float64)[order]
        val[pos] = np.where(v > 0, v, 0.0)   # NaN, 0, negative count as 0, as in `fuse`
        gn = np.zeros(r * width)
        gn[pos] = np.asarray(gain, dtype=np.float64)[order]
        gn = gn.reshape(r, width)
        kk = min(k, width)
        ideal = -np.sort(-gn, axis=1)[:, :kk]
        ideal_dcg = (ideal * _discount(kk)).sum(axis=1)
        flat = lambda d: {name: np.ascontiguousarray(np.asarray(v, dtype=np.float64)[order])  # noqa: E731
                          for name, v in d.items()}
        return cls(flat(outputs), flat(columns), pos, val.reshape(r, width), gn, ideal_dcg, k, n, r, width)

    def describe(self) -> dict:
        return {"rows": self.rows, "requests": self.requests, "max_len": self.width,
                "ndcg_requests": int((self.ideal_dcg > 0).sum()),
                "ndcg_excluded_requests": int((self.ideal_dcg <= 0).sum())}


def _discount(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))  # rank r (1-based) -> 1 / log2(r + 1)


@dataclass(frozen=True)
class Metrics:
    value: float  # value@K (e.g. expected GMV), mean over all requests (NaN when not configured)
    ndcg: float   # NDCG@K, mean over requests with a positive (NaN when there are none)

    def get(self, objective: str) -> float:
        return self.value if objective == "value" else self.ndcg


def evaluate(m: RequestMatrix, params: Mapping[str, float], plan: FusionPlan, k: int | None = None,
             has_value: bool = True) -> Metrics:
    """value@K and NDCG@K of ranking every request by the fused score under `params`."""
    k = min(k or m.k_max, m.k_max, m.width)
    if m.requests == 0:
        return Metrics(float("nan"), float("nan"))
    cols, _, eligible = fuse(m.outputs, m.columns, np.ones(m.rows), plan.with_params(params))
    score = np.full(m.requests * m.width, -np.inf)
    score[m.pos] = np.where(eligible, cols["score"], -np.inf)
    top = np.argsort(-score.reshape(m.requests, m.width), axis=1, kind="stable")[:, :k]  # padding sorts last
    value = np.take_along_axis(m.value, top, axis=1).sum(axis=1).mean() if has_value else float("nan")
    dcg = (np.take_along_axis(m.gain, top, axis=1) * _discount(k)).sum(axis=1)
    ideal_dcg = m.ideal_dcg if k == min(m.k_max, m.width) else (-np.sort(-m.gain, axis=1)[:, :k] * _discount(k)).sum(axis=1)
    has = ideal_dcg > 0
    ndcg = (dcg[has] / ideal_dcg[has]).mean() if has.any() else float("nan")
    return Metrics(float(value), float(ndcg))


@dataclass
class Trial:
    index: int
    phase: str            # start | random | refine
    params: dict[str, float]
    value: float
    ndcg: float


@dataclass
class SearchResult:
    objective: str
    k: int
    seed: int
    trials: list[Trial]
    best: int                       # index into trials
    fixed: list[str] = field(default_factory=list)   # parameters held at their start value
    seconds: float = 0.0

    @property
    def start(self) -> Trial:
        return self.trials[0]

    @property
    def best_trial(self) -> Trial:
        return self.trials[self.best]

    def to_dict(self) -> dict:
        return {"objective": self.objective, "k": self.k, "seed": self.seed, "best_trial": self.best,
                "fixed": self.fixed, "seconds": self.seconds,
                "ms_per_trial": 1e3 * self.seconds / max(len(self.trials), 1),
                "trials": [asdict(t) for t in self.trials]}


def _draw(rng: np.random.Generator, n: int, bounds: dict[str, tuple[float, float, bool]],
          start: dict[str, float]) -> list[dict[str, float]]:
    cols = {}
    for p, (lo, hi, log) in bounds.items():
        cols[p] = np.exp(rng.uniform(math.log(lo), math.log(hi), n)) if log else rng.uniform(lo, hi, n)
    return [{**start, **{p: float(cols[p][i]) for p in bounds}} for i in range(n)]


def _neighbours(best: dict[str, float], bounds: dict[str, tuple[float, float, bool]],
                step: float) -> list[dict[str, float]]:
    """Each free parameter multiplied and divided by `step` (a parameter at 0 tries a small value)."""
    out = []
    for p, (lo, hi, _) in bounds.items():
        v = best[p]
        cands = [v * step, v / step] if v > 0 else [min(hi, 0.05 * step)]
        for c in cands:
            c = float(min(max(c, lo), hi))
            if c != v:
                out.append({**best, p: c})
    return out


def search(tune: RequestMatrix, plan: FusionPlan, *, k: int = 10, trials: int = 200,
           objective: str = "ndcg", seed: int = 0, refine_share: float = 0.25,
           has_value: bool = True) -> SearchResult:
    """Seeded random search, then coordinate refinement around the best; `trials` evaluations in all.

    Trial 0 is the plan's own parameters. About `refine_share` of the budget goes to refinement:
    each free parameter multiplied / divided by a step (2, then sqrt(2), ...), keeping improvements.
    Only `tune` is looked at; the caller evaluates the result on its holdout.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "value" and not has_value:
        raise ValueError("objective value needs score.tune.value_column and value_task in the job config")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    t0 = time.perf_counter()
    bounds = plan.bounds()
    start = plan.params()
    log: list[Trial] = []

    def run(params: dict[str, float], phase: str) -> float:
        m = evaluate(tune, params, plan, k, has_value)
        log.append(Trial(len(log), phase, params, m.value, m.ndcg))
        v = m.get(objective)
        return v if v == v else -np.inf  # NaN (no request with a positive) never wins

    best_v, best = run(start, "start"), 0
    n_refine = int(round((trials - 1) * refine_share)) if bounds else 0
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7475]))
    for params in _draw(rng, trials - 1 - n_refine if bounds else 0, bounds, start):
        v = run(params, "random")
        if v > best_v:
            best_v, best = v, len(log) - 1
    step, left = 2.0, n_refine
    while left > 0:
        improved = False
        for params in _neighbours(log[best].params, bounds, step):
            if left == 0:
                break
            left -= 1
            v = run(params, "refine")
            if v > best_v:
                best_v, best, improved = v, len(log) - 1, True
        if not improved:
            step = math.sqrt(step)
            if step < 1.01:
                break
    return SearchResult(objective, k, seed, log, best, [p for p in start if p not in bounds],
                        time.perf_counter() - t0)


def relative_change(start: float, best: float) -> float:
    """(best - start) / |start|; NaN when the start is 0 or undefined."""
    if not (start == start and best == best) or start == 0:
        return float("nan")
    return (best - start) / abs(start)
