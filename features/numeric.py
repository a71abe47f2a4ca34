"""Numeric transforms and their fitted statistics.

Order is fixed: fill -> clip -> log1p -> (standardize | bucketize). Standardisation statistics are
fitted once on the training window (rows that passed validation) and saved with the model, so
training and scoring transform identically. Statistics are kept as mergeable running moments
(count, mean, M2; Chan et al.'s parallel update), so shards, days and incremental runs combine
exactly instead of being recomputed with a different meaning.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import polars as pl

from features.spec import FeatureSpec, NumericFeature


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


@dataclass
class NumericStats:
    """Per-feature moments of the pre-standardisation values."""

    moments: dict[str, Moments] = field(default_factory=dict)

    def merge(self, other: "NumericStats") -> "NumericStats":
        names = dict.fromkeys([*self.moments, *other.moments])
        return NumericStats({n: self.moments.get(n, Moments()).merge(other.moments.get(n, Moments()))
                             for n in names})

    @staticmethod
    def of_frame(df: pl.DataFrame, spec: FeatureSpec) -> "NumericStats":
        feats = [f for f in spec.dense if f.standardize]
        if not feats or df.height == 0:
            return NumericStats({f.name: Moments() for f in feats})
        exprs = []
        for f in feats:
            x = pre_standardize_expr(f)
            exprs += [x.count().alias(f"{f.name}/n"), x.mean().alias(f"{f.name}/mean"),
                      ((x - x.mean()) ** 2).sum().alias(f"{f.name}/m2")]
        row = df.select(exprs).row(0, named=True)
        return NumericStats({f.name: Moments(int(row[f"{f.name}/n"]), float(row[f"{f.name}/mean"] or 0.0),
                                             float(row[f"{f.name}/m2"] or 0.0)) for f in feats})

    def to_json(self) -> str:
        return json.dumps({k: vars(m) for k, m in self.moments.items()}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "NumericStats":
        return NumericStats({k: Moments(**v) for k, v in json.loads(text).items()})

    def missing(self, spec: FeatureSpec) -> list[str]:
        return [f.name for f in spec.dense if f.standardize and self.moments.get(f.name, Moments()).count == 0]


def dense_expr(f: NumericFeature, stats: NumericStats) -> pl.Expr:
    x = pre_standardize_expr(f)
    if f.standardize:
        m = stats.moments[f.name]
        x = (x - m.mean) / m.std
    return x.cast(pl.Float32)
