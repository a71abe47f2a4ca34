"""Stable feature hashing: the same value gives the same id on every machine, process and version.

The rule (pinned by golden-value tests; changing it invalidates every trained model):

    table_seed = xxh64(b"mtrank/table:" + table_name, seed=hash_seed)
    id(value)  = 1 + xxh64(canonical(value), seed=table_seed) % (buckets - 1)
    id(null)   = 0

`canonical` is the UTF-8 text of the value: strings as they are, integers in decimal ("123"),
so an id column stored as int64 in one day and as string in another hashes identically, and a
list of category strings hashes like the int64 category column that shares its table. This is
`xxh64(f"{table}={value}")` in spirit, with the field folded into the seed instead of concatenated
(4x cheaper: no per-row string building). The namespace is the *table*, so fields that share a
table share ids. XXH64 is a fixed, specified algorithm (unlike Python's `hash()` or polars'
`Expr.hash`, whose docs say it is not stable across versions); polars-hash and the `xxhash`
package both implement it and the tests check they agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import polars_hash  # noqa: F401  (registers the `nchash` expression namespace)
import xxhash

from mtrank.features.spec import FeatureSpec, MultiHotFeature, NumericFeature

NULL_ID = 0
_TABLE_PREFIX = b"mtrank/table:"
_GROUP_SEED_NAME = "mtrank/group"


def table_seed(table: str, hash_seed: int) -> int:
    return xxhash.xxh64_intdigest(_TABLE_PREFIX + table.encode("utf-8"), hash_seed)


def canonical_text(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """The canonical text of an id column (strings unchanged, integers in decimal)."""
    if dtype == pl.String:
        return expr
    if dtype.is_integer():
        return expr.cast(pl.String)
    if isinstance(dtype, pl.Categorical | pl.Enum):
        return expr.cast(pl.String)
    raise TypeError(f"cannot hash a column of type {dtype}: ids must be strings or integers")


def hash_expr(expr: pl.Expr, dtype: pl.DataType, seed: int, buckets: int) -> pl.Expr:
    """Vectorised ids in [0, buckets) as Int64; null -> NULL_ID."""
    h = canonical_text(expr, dtype).nchash.xxhash64(seed=seed)
    return (h % (buckets - 1) + 1).fill_null(NULL_ID).cast(pl.Int64)


def hash_value(value: object, table: str, hash_seed: int, buckets: int) -> int:
    """Row-at-a-time path (single requests, tests); must equal `hash_expr` for every value."""
    if value is None:
        return NULL_ID
    if isinstance(value, bool | float | np.floating | np.bool_):
        raise TypeError(f"cannot hash {type(value).__name__} {value!r}: ids must be strings or integers")
    if isinstance(value, int | np.integer):
        text = str(int(value))
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"cannot hash {type(value).__name__}: ids must be strings or integers")
    return 1 + xxhash.xxh64_intdigest(text.encode("utf-8"), table_seed(table, hash_seed)) % (buckets - 1)


def group_key_expr(expr: pl.Expr, dtype: pl.DataType, hash_seed: int) -> pl.Expr:
    """A 64-bit key per group (user) for GAUC; not bucketed, so groups never merge in practice."""
    h = canonical_text(expr, dtype).nchash.xxhash64(seed=table_seed(_GROUP_SEED_NAME, hash_seed))
    return h.reinterpret(signed=True).fill_null(0)


@dataclass(frozen=True)
class CollisionStats:
    """Distinct raw values vs distinct ids they hash to, for one table."""

    table: str
    buckets: int
    distinct_values: int
    distinct_ids: int

    @property
    def collision_rate(self) -> float:
        """Share of distinct values that landed on an id some other value already took."""
        if self.distinct_values == 0:
            return 0.0
        return 1.0 - self.distinct_ids / self.distinct_values

    def as_dict(self) -> dict:
        return {"table": self.table, "buckets": self.buckets, "distinct_values": self.distinct_values,
                "distinct_ids": self.distinct_ids, "collision_rate": round(self.collision_rate, 6)}


def table_collisions(frame: pl.LazyFrame, spec: FeatureSpec) -> dict[str, CollisionStats]:
    """Per table: distinct raw values (over all its fields) vs distinct ids; one lazy query each."""
    schema = frame.collect_schema()
    out: dict[str, CollisionStats] = {}
    for tab in spec.embedding_tables.values():
        feats = [spec.feature_by_name[f] for f in tab.fields]
        if any(isinstance(f, NumericFeature) for f in feats):
            continue  # bucketized numerics are not hashed
        parts = []
        for f in feats:
            col, dtype = pl.col(f.name), schema[f.name]
            if isinstance(f, MultiHotFeature):
                col, dtype = col.explode(empty_as_null=False, keep_nulls=False), dtype.inner
            parts.append(frame.select(canonical_text(col, dtype).alias("v")))
        seed = table_seed(tab.name, spec.hash_seed)
        row = (pl.concat(parts).drop_nulls().unique()
               .select(pl.len().alias("values"),
                       pl.col("v").nchash.xxhash64(seed=seed).mod(tab.buckets - 1).n_unique().alias("ids"))
               .collect().row(0))
        out[tab.name] = CollisionStats(tab.name, tab.buckets, int(row[0]), int(row[1]) if row[0] else 0)
    return out
