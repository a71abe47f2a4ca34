"""Numeric transforms and their fitted statistics.

Order is fixed: fill -> clip -> log1p -> (standardize | bucketize). Standardisation statistics are
fitted once on the training window (rows that passed validation) and saved with the model, so
training and scoring transform identically. Statistics are kept as mergeable running moments
(count, mean, M2; Chan et al.'s parallel update), so shards, days and incremental runs combine
exactly instead of being recomputed with a different meaning.

Piecewise-linear encoding (Gorishniy et al., NeurIPS 2022) needs quantile edges: each such feature
keeps a mergeable weighted histogram of its pre-standardisation values (`QuantileSketch`: exact while
it holds at most `SKETCH_SIZE` distinct values, compressed to about that many centroids beyond, heavy
values kept exact), and the edges are a deterministic function of the histogram and the spec's `bins`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from mtrank.features.spec import FeatureSpec, NumericFeature


def pre_standardize_expr(f: NumericFeature) -> pl.Expr:
    x = pl.col(f.name).cast(pl.Float64)
    if f.fill is not None:
        x = x.fill_null(f.fill)
    if f.clip is not None:
        x = x.clip(f.clip[0], f.clip[1])
    if f.log1p:
        x = x.clip(lower_bound=0.0).log1p()  # log1p of max(x, 0): defined for every input
    return x


def bucket_expr(f: NumericFeature) -> pl.Expr:
    """Bucket id in 1..len(boundaries)+1 (value < b0 -> 1, value >= b_last -> last); null -> 0."""
    x = pre_standardize_expr(f)
    idx = pl.sum_horizontal([(x >= b).cast(pl.Int64) for b in f.boundaries]) + 1
    return pl.when(x.is_null()).then(0).otherwise(idx).cast(pl.Int64)


@dataclass
class Moments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return Moments(self.count, self.mean, self.m2)
        if self.count == 0:
            return Moments(other.count, other.mean, other.m2)
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return Moments(n, mean, m2)

    @property
    def std(self) -> float:
        """Population std; a constant column gets 1 so standardising never divides by zero."""
        if self.count < 2:
            return 1.0
        s = math.sqrt(self.m2 / self.count)
        return s if s > 1e-12 else 1.0


SKETCH_SIZE = 2048           # centroids a QuantileSketch keeps (quantile error ~ 1 / SKETCH_SIZE of the mass)
_QUANTILES = "__quantiles__"  # key of the sketches in NumericStats' JSON (absent when there are none)


@dataclass
class QuantileSketch:
    """Weighted histogram of values: sorted distinct `values` with their `counts`. Exact (every
    distinct value) up to `SKETCH_SIZE` distinct values; beyond, adjacent light values are merged into
    their weighted mean by equal-mass groups, while values holding >= 1/SKETCH_SIZE of the mass stay
    exact. Merging is exact while the union stays within the size, so shards and days combine like
    fitting the whole."""

    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __eq__(self, other: object) -> bool:   # arrays: the dataclass default would be ambiguous
        return (isinstance(other, QuantileSketch) and np.array_equal(self.values, other.values)
                and np.array_equal(self.counts, other.counts))

    @property
    def count(self) -> float:
        return float(self.counts.sum())

    @staticmethod
    def of_values(x: np.ndarray) -> "QuantileSketch":
        x = np.asarray(x, np.float64)
        v, c = np.unique(x[np.isfinite(x)], return_counts=True)
        return QuantileSketch(v, c.astype(np.float64)).compressed()

    def merge(self, other: "QuantileSketch") -> "QuantileSketch":
        v, inv = np.unique(np.concatenate([self.values, other.values]), return_inverse=True)
        c = np.bincount(inv, weights=np.concatenate([self.counts, other.counts]), minlength=v.size)
        return QuantileSketch(v, c).compressed()

    def compressed(self, size: int = SKETCH_SIZE) -> "QuantileSketch":
        v, c = self.values, self.counts
        if v.size <= size:
            return self
        total = c.sum()
        heavy = c >= total / size
        group = np.floor((np.cumsum(c) - c / 2) / total * size).astype(np.int64)   # by mid-mass position
        start = np.ones(v.size, bool)
        start[1:] = (group[1:] != group[:-1]) | heavy[1:] | heavy[:-1]
        gid = np.cumsum(start) - 1
        w = np.bincount(gid, weights=c)
        mean = np.bincount(gid, weights=c * v) / w
        mean[heavy[start]] = v[start & heavy]          # a heavy value is its own group: keep it exact
        return QuantileSketch(mean, w)

    def edges(self, bins: int) -> np.ndarray:
        """Tie-aware equal-frequency edges b_0 < ... < b_k (k <= bins), all of them values of the
        histogram: b_0 = the minimum; then each next edge is the first value at which the mass above the
        previous edge reaches (mass left) / (bins left), so a value heavier than a bin becomes an edge
        of its own (x equal to it has an exact code) and the remaining bins split the rest. Fewer
        distinct values than bins + 1: every value is an edge."""
        v, c = self.values, self.counts
        if v.size <= bins + 1:
            return v.copy()
        cum = np.cumsum(c)
        total = cum[-1]
        idx = [0]
        for k in range(bins, 1, -1):       # bins left after the previous edge (a loop over bins, not rows)
            i = idx[-1]
            need = cum[i] + (total - cum[i]) / k
            j = int(np.searchsorted(cum, need * (1 - 1e-12), side="left"))
            idx.append(min(max(j, i + 1), v.size - k))   # leave a distinct value for every later edge
        idx.append(v.size - 1)
        return v[np.asarray(idx)]

    def to_dict(self) -> dict:
        return {"values": self.values.tolist(), "counts": self.counts.tolist()}

    @staticmethod
    def from_dict(d: dict) -> "QuantileSketch":
        return QuantileSketch(np.asarray(d["values"], np.float64), np.asarray(d["counts"], np.float64))


def target_key(task: str) -> str:
    return f"target/{task}"


@dataclass
class NumericStats:
    """Per-feature moments of the pre-standardisation values, and the quantile sketches of the
    piecewise-linear features."""

    moments: dict[str, Moments] = field(default_factory=dict)
    sketches: dict[str, QuantileSketch] = field(default_factory=dict)

    def merge(self, other: "NumericStats") -> "NumericStats":
        names = dict.fromkeys([*self.moments, *other.moments])
        sk = dict.fromkeys([*self.sketches, *other.sketches])
        return NumericStats({n: self.moments.get(n, Moments()).merge(other.moments.get(n, Moments()))
                             for n in names},
                            {n: self.sketches.get(n, QuantileSketch()).merge(other.sketches.get(n, QuantileSketch()))
                             for n in sk})

    def edges(self, f: NumericFeature) -> np.ndarray:
        """The piecewise-linear bin edges of `f` (strictly increasing, at most f.bins + 1)."""
        return self.sketches[f.name].edges(f.bins)

    @staticmethod
    def of_frame(df: pl.DataFrame, spec: FeatureSpec) -> "NumericStats":
        """Moments of every standardised feature, and of each task's target on its population
        (key `target/<task>`, in loss space: positive rate for binary, log1p for mse_log1p) when the
        label column is present."""
        named = {f.name: pre_standardize_expr(f) for f in spec.dense if f.standardize}
        for t in spec.tasks:
            if t.label in df.columns:
                y = pl.col(t.label).cast(pl.Float64)
                if t.type == "binary":
                    y = (y > 0).cast(pl.Float64)
                elif t.loss == "mse_log1p":
                    y = y.clip(lower_bound=0.0).log1p()
                space = spec.space_label(t)
                named[target_key(t.name)] = y if space is None else y.filter(pl.col(space) > 0)
        ple = [f for f in spec.dense if f.piecewise_linear]
        sketches = {f.name: QuantileSketch() for f in ple}
        if ple and df.height:
            vals = df.select([pre_standardize_expr(f).alias(f.name) for f in ple])
            sketches = {f.name: QuantileSketch.of_values(vals.get_column(f.name).drop_nulls().to_numpy())
                        for f in ple}
        if not named or df.height == 0:
            return NumericStats({n: Moments() for n in named}, sketches)
        exprs = []
        for n, x in named.items():
            exprs += [x.count().alias(f"{n}/n"), x.mean().alias(f"{n}/mean"),
                      ((x - x.mean()) ** 2).sum().alias(f"{n}/m2")]
        row = df.select(exprs).row(0, named=True)
        return NumericStats({n: Moments(int(row[f"{n}/n"]), float(row[f"{n}/mean"] or 0.0),
                                        float(row[f"{n}/m2"] or 0.0)) for n in named}, sketches)

    def target(self, task: str) -> Moments | None:
        m = self.moments.get(target_key(task))
        return m if m is not None and m.count else None

    def to_json(self) -> str:
        d: dict = {k: vars(m) for k, m in self.moments.items()}
        if self.sketches:   # absent without piecewise-linear features: the moments-only format is unchanged
            d[_QUANTILES] = {k: s.to_dict() for k, s in self.sketches.items()}
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "NumericStats":
        d = json.loads(text)
        sk = {k: QuantileSketch.from_dict(v) for k, v in d.pop(_QUANTILES, {}).items()}
        return NumericStats({k: Moments(**v) for k, v in d.items()}, sk)

    def missing(self, spec: FeatureSpec) -> list[str]:
        return [f.name for f in spec.dense
                if (f.standardize and self.moments.get(f.name, Moments()).count == 0)
                or (f.piecewise_linear and self.sketches.get(f.name, QuantileSketch()).count == 0)]


def piecewise_linear_exprs(x: pl.Expr, edges: np.ndarray, bins: int) -> list[pl.Expr]:
    """`bins` columns: component t = (x - b[t-1]) / (b[t] - b[t-1]) clamped to [0, 1], except that the
    first bin is not clamped below and the last not above (a single bin: not at all); columns past
    the fitted bins (fewer edges than bins + 1) are 0. A null x gives nulls."""
    k = max(len(edges) - 1, 0)
    out = []
    for t in range(bins):
        if t >= k:
            out.append(pl.when(x.is_null()).then(None).otherwise(pl.lit(0.0)))
            continue
        lo, hi = float(edges[t]), float(edges[t + 1])
        e = (x - lo) / (hi - lo)
        if t > 0:
            e = e.clip(lower_bound=0.0)
        if t < k - 1:
            e = e.clip(upper_bound=1.0)
        out.append(e)
    return out


def dense_exprs(f: NumericFeature, stats: NumericStats) -> list[pl.Expr]:
    """The feature's `f.dense_width` dense columns, in order: the scalar value (scalar encoding, or
    piecewise_linear with keep_value), then the piecewise-linear bins."""
    x = pre_standardize_expr(f)
    out = []
    if not f.piecewise_linear or f.keep_value:
        v = x
        if f.standardize:
            m = stats.moments[f.name]
            v = (x - m.mean) / m.std
        out.append(v)
    if f.piecewise_linear:
        out += piecewise_linear_exprs(x, stats.edges(f), f.bins)
    return [e.cast(pl.Float32) for e in out]


def dense_expr(f: NumericFeature, stats: NumericStats) -> pl.Expr:
    """The one dense column of a scalar-encoded feature."""
    if f.dense_width != 1 or f.piecewise_linear:
        raise ValueError(f"{f.name}: {f.dense_width} dense columns; use dense_exprs")
    return dense_exprs(f, stats)[0]
