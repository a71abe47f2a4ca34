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


def target_key(task: str) -> str:
    return f"target/{task}"


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
        if not named or df.height == 0:
            return NumericStats({n: Moments() for n in named})
        exprs = []
        for n, x in named.items():
            exprs += [x.count().alias(f"{n}/n"), x.mean().alias(f"{n}/mean"),
                      ((x - x.mean()) ** 2).sum().alias(f"{n}/m2")]
        row = df.select(exprs).row(0, named=True)
        return NumericStats({n: Moments(int(row[f"{n}/n"]), float(row[f"{n}/mean"] or 0.0),
                                        float(row[f"{n}/m2"] or 0.0)) for n in named})

    def target(self, task: str) -> Moments | None:
        m = self.moments.get(target_key(task))
        return m if m is not None and m.count else None

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
