"""Offline search of the fusion parameters (alpha, beta, a, b, c) on logged requests: pure numpy.

A logged day is laid out once as a padded [requests, max_len] matrix. One trial fuses every row with
`fuse` (the scorer's own formula, rule_weight = 1), sorts each request by fused score (one argsort
along axis 1) and gathers two offline objectives over the top K:

- expected GMV@K: sum of price * conversion over the top K, averaged over all requests;
- NDCG@K over graded actions: gain 0 no click, 1 click, 2 cart or collect, 3 conversion (the highest
  that applies), DCG = sum gain / log2(rank + 1), divided by the DCG of the request's ideal order;
  requests with no positive (ideal DCG 0) are left out of the mean (their count is reported).

Requests are split deterministically into a tuning half and a holdout half by an xxhash64 of the
request id (`split_requests`); the search sees the tuning half only, and its claim is the holdout.
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

from pipeline.scoring.config import FusionConfig
from pipeline.scoring.fusion import CART, COLLECT, CTR, CVR, STAY, fuse

PARAMS = ("alpha", "beta", "a", "b", "c")
# search box: (low, high, log-uniform?)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "alpha": (1e-3, 1.0, True), "beta": (1e-1, 1e3, True),
    "a": (0.0, 2.0, False), "b": (0.0, 2.0, False), "c": (0.0, 2.0, False)}
# the exponent that switches a task off when the model has no such output
EXPONENT_OF = {STAY: "a", CART: "b", COLLECT: "c"}
OBJECTIVES = ("gmv", "ndcg")
SPLIT_SEED = 0x6D7472616E6B  # "mtrank": fixed, so every run splits a day the same way
GAIN_CLICK, GAIN_CART_COLLECT, GAIN_CONVERSION = 1.0, 2.0, 3.0


def split_requests(request_ids: np.ndarray, seed: int = SPLIT_SEED) -> np.ndarray:
    """Per row: True = holdout, False = tuning. xxhash64 of the id's text (integers in decimal),
    so the split is the same on every machine and run, and all rows of a request land together."""
    s = pl.Series("r", request_ids)
    if s.dtype != pl.String:
        s = s.cast(pl.String)
    h = s.to_frame().select(pl.col("r").nchash.xxhash64(seed=seed).fill_null(0)).to_series().to_numpy()
    return (h & 1).astype(bool)


def graded_gain(click: np.ndarray, conversion: np.ndarray, cart: np.ndarray, collect: np.ndarray) -> np.ndarray:
    """0 no click, 1 click, 2 cart or collect, 3 conversion: the highest that applies."""
    g = np.where(np.asarray(click) > 0, GAIN_CLICK, 0.0)
    g = np.where((np.asarray(cart) > 0) | (np.asarray(collect) > 0), GAIN_CART_COLLECT, g)
    return np.where(np.asarray(conversion) > 0, GAIN_CONVERSION, g)


def _clean_price(price: np.ndarray) -> np.ndarray:
    price = np.asarray(price, dtype=np.float64)
    return np.where(price > 0, price, 0.0)  # NaN, 0, negative count as 0, as in `fuse`


@dataclass(frozen=True)
class RequestMatrix:
    """Rows of logged requests, grouped by request; within a request by item id when `item_ids` are
    given (so equal fused scores rank as the scorer ranks them: `rerank` breaks ties by item), else
    in logged order.

    `outputs`/`price` are flat (what `fuse` reads); `pos` puts flat row i at [pos // L, pos % L] of
    the padded [requests, L] matrices `gmv` (price * conversion) and `gain` (graded action).
    """
    outputs: dict[str, np.ndarray]
    price: np.ndarray
    pos: np.ndarray
    gmv: np.ndarray
    gain: np.ndarray
    ideal_dcg: np.ndarray      # [requests] at k_max
    k_max: int
    rows: int
    requests: int
    width: int

    @classmethod
    def build(cls, request_ids: np.ndarray, outputs: Mapping[str, np.ndarray], price: np.ndarray,
              click: np.ndarray, conversion: np.ndarray, cart: np.ndarray, collect: np.ndarray,
              k: int, item_ids: np.ndarray | None = None) -> "RequestMatrix":
        n = len(request_ids)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        for name, arr in {"price": price, "click": click, "conversion": conversion, "cart": cart,
                          "collect": collect, **outputs}.items():
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
        p = _clean_price(price)[order]
        gmv = np.zeros(r * width)
        gmv[pos] = p * (np.asarray(conversion)[order] > 0)
        gain = np.zeros(r * width)
        gain[pos] = graded_gain(*(np.asarray(x)[order] for x in (click, conversion, cart, collect)))
        gain = gain.reshape(r, width)
        kk = min(k, width)
        ideal = -np.sort(-gain, axis=1)[:, :kk]
        ideal_dcg = (ideal * _discount(kk)).sum(axis=1)
        outs = {name: np.ascontiguousarray(np.asarray(v, dtype=np.float64)[order]) for name, v in outputs.items()}
        return cls(outs, np.asarray(price, dtype=np.float64)[order], pos, gmv.reshape(r, width), gain,
                   ideal_dcg, k, n, r, width)

    def describe(self) -> dict:
        return {"rows": self.rows, "requests": self.requests, "max_len": self.width,
                "ndcg_requests": int((self.ideal_dcg > 0).sum()),
                "ndcg_excluded_requests": int((self.ideal_dcg <= 0).sum())}


def _discount(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))  # rank r (1-based) -> 1 / log2(r + 1)


@dataclass(frozen=True)
class Metrics:
    gmv: float    # expected GMV@K, mean over all requests
    ndcg: float   # NDCG@K, mean over requests with a positive (NaN when there are none)

    def get(self, objective: str) -> float:
        return self.gmv if objective == "gmv" else self.ndcg


def with_params(base: FusionConfig, params: Mapping[str, float]) -> FusionConfig:
    """A copy of `base` (price handling, re-calibration kept) carrying the trial's parameters."""
    return base.model_copy(update={k: float(params[k]) for k in PARAMS if k in params})


def evaluate(m: RequestMatrix, params: Mapping[str, float], base: FusionConfig, k: int | None = None) -> Metrics:
    """GMV@K and NDCG@K of ranking every request by the fused score under `params`."""
    k = min(k or m.k_max, m.k_max, m.width)
    if m.requests == 0:
        return Metrics(float("nan"), float("nan"))
    cols, _ = fuse(m.outputs, m.price, np.ones(m.rows), with_params(base, params))
    score = np.full(m.requests * m.width, -np.inf)
    score[m.pos] = cols["score"]
    top = np.argsort(-score.reshape(m.requests, m.width), axis=1, kind="stable")[:, :k]  # padding sorts last
    gmv = np.take_along_axis(m.gmv, top, axis=1).sum(axis=1).mean()
    dcg = (np.take_along_axis(m.gain, top, axis=1) * _discount(k)).sum(axis=1)
    has = m.ideal_dcg > 0
    ndcg = (dcg[has] / m.ideal_dcg[has]).mean() if has.any() else float("nan")
    return Metrics(float(gmv), float(ndcg))


@dataclass
class Trial:
    index: int
    phase: str            # start | random | refine
    params: dict[str, float]
    gmv: float
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


def start_params(cfg: FusionConfig) -> dict[str, float]:
    return {k: float(getattr(cfg, k)) for k in PARAMS}


def free_params(outputs: Mapping[str, np.ndarray] | RequestMatrix) -> list[str]:
    """Parameters the search may move: an exponent whose task output the model lacks stays put."""
    names = outputs.outputs if isinstance(outputs, RequestMatrix) else outputs
    missing = [k for k in (CTR, CVR) if k not in names]
    if missing:
        raise ValueError(f"the model has no output {', '.join(missing)}; the fusion formula needs it")
    return [p for p in PARAMS if not any(e == p and o not in names for o, e in EXPONENT_OF.items())]


def _draw(rng: np.random.Generator, n: int, names: list[str], start: dict[str, float]) -> list[dict[str, float]]:
    cols = {}
    for p in PARAMS:
        lo, hi, log = BOUNDS[p]
        if p not in names:
            cols[p] = np.full(n, start[p])
        elif log:
            cols[p] = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
        else:
            cols[p] = rng.uniform(lo, hi, n)
    return [{p: float(cols[p][i]) for p in PARAMS} for i in range(n)]


def _neighbours(best: dict[str, float], names: list[str], step: float) -> list[dict[str, float]]:
    """Each free parameter multiplied and divided by `step` (an exponent at 0 tries a small value)."""
    out = []
    for p in names:
        lo, hi, _ = BOUNDS[p]
        v = best[p]
        cands = [v * step, v / step] if v > 0 else [min(hi, 0.05 * step)]
        for c in cands:
            c = float(min(max(c, lo), hi))
            if c != v:
                out.append({**best, p: c})
    return out


def search(tune: RequestMatrix, base: FusionConfig, *, k: int = 10, trials: int = 200,
           objective: str = "gmv", seed: int = 0, refine_share: float = 0.25) -> SearchResult:
    """Seeded random search, then coordinate refinement around the best; `trials` evaluations in all.

    Trial 0 is `base`'s own parameters. About `refine_share` of the budget goes to refinement:
    each free parameter multiplied / divided by a step (2, then sqrt(2), ...), keeping improvements.
    Only `tune` is looked at; the caller evaluates the result on its holdout.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    t0 = time.perf_counter()
    names = free_params(tune)
    start = start_params(base)
    log: list[Trial] = []

    def run(params: dict[str, float], phase: str) -> float:
        m = evaluate(tune, params, base, k)
        log.append(Trial(len(log), phase, params, m.gmv, m.ndcg))
        v = m.get(objective)
        return v if v == v else -np.inf  # NaN (no request with a positive) never wins

    best_v, best = run(start, "start"), 0
    n_refine = int(round((trials - 1) * refine_share)) if names else 0
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7475]))
    for params in _draw(rng, trials - 1 - n_refine if names else 0, names, start):
        v = run(params, "random")
        if v > best_v:
            best_v, best = v, len(log) - 1
    step, left = 2.0, n_refine
    while left > 0:
        improved = False
        for params in _neighbours(log[best].params, names, step):
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
    return SearchResult(objective, k, seed, log, best, [p for p in PARAMS if p not in names],
                        time.perf_counter() - t0)


def relative_change(start: float, best: float) -> float:
    """(best - start) / |start|; NaN when the start is 0 or undefined."""
    if not (start == start and best == best) or start == 0:
        return float("nan")
    return (best - start) / abs(start)
