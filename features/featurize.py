"""Raw columns -> model-ready numpy arrays, for a whole chunk of rows at once.

Layout per embedding table (the EmbeddingBag convention): the fields sharing a table form k bags
per row, bag b = row * k + slot, so one lookup serves every field of the table. A table whose
fields are all single-valued needs no offsets (every bag holds exactly one id) and the model can
use a plain gather; mean-pooled multi-hot bags carry per-id weights 1/len so one 'sum' lookup
pools every field. Null multi-hot lists are empty bags; null ids are NULL_ID.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from features.hashing import group_key_expr, hash_expr, table_seed
from features.numeric import NumericStats, bucket_expr, dense_expr
from features.spec import CategoricalFeature, FeatureSpec, MultiHotFeature, NumericFeature


@dataclass
class TableArrays:
    values: np.ndarray               # int64 [n_ids]
    offsets: np.ndarray | None       # int64 [rows * k] bag starts; None: one id per bag
    weights: np.ndarray | None       # float32 [n_ids] per-id pooling weights; None: all 1


@dataclass
class FeatureArrays:
    rows: int
    tables: dict[str, TableArrays]
    dense: np.ndarray                # float32 [rows, n_dense]
    labels: dict[str, np.ndarray]    # task -> float32 [rows]
    masks: dict[str, np.ndarray]     # task -> bool [rows]: row belongs to the task's training space
    group: np.ndarray                # int64 [rows] GAUC group key (hashed user)
    truth: dict[str, np.ndarray]     # task -> float32 [rows], only for truth columns present


class Featurizer:
    """A FeatureSpec with its fitted numeric statistics: everything needed to hash and transform."""

    def __init__(self, spec: FeatureSpec, stats: NumericStats | None = None):
        missing = (stats or NumericStats()).missing(spec)
        if missing:
            raise ValueError(f"numeric statistics missing for standardized features: {missing}")
        self.spec, self.stats = spec, stats or NumericStats()
        self._seeds = {t: table_seed(t, spec.hash_seed) for t in spec.embedding_tables}
        self._table_of: dict[str, str] = {f: t.name for t in spec.embedding_tables.values() for f in t.fields}

    # ------------------------------------------------------------------------------------------
    def _id_expr(self, f: CategoricalFeature | MultiHotFeature | NumericFeature, schema: pl.Schema) -> pl.Expr:
        table = self.spec.embedding_tables[self._table_of[f.name]]
        if isinstance(f, NumericFeature):
            return bucket_expr(f)
        col = pl.col(f.name)
        dtype = schema[f.name]
        if isinstance(f, MultiHotFeature):
            col = col.explode(empty_as_null=False, keep_nulls=False)
            dtype = dtype.inner
        return hash_expr(col, dtype, self._seeds[table.name], table.buckets)

    def transform(self, df: pl.DataFrame, with_labels: bool = True) -> FeatureArrays:
        spec, schema, n = self.spec, df.schema, df.height
        # One select for every row-aligned output: polars runs the columns in parallel.
        exprs: list[pl.Expr] = [group_key_expr(pl.col(spec.group_key), schema[spec.group_key], spec.hash_seed)
                                .alias("__group")]
        for f in spec.features:
            if isinstance(f, CategoricalFeature) or (isinstance(f, NumericFeature) and f.bucketized):
                exprs.append(self._id_expr(f, schema).alias(f"__id/{f.name}"))
            elif isinstance(f, MultiHotFeature):
                exprs.append(pl.col(f.name).list.len().fill_null(0).cast(pl.Int64).alias(f"__len/{f.name}"))
        exprs += [dense_expr(f, self.stats).alias(f"__dense/{f.name}") for f in spec.dense]
        if with_labels:
            for t in spec.tasks:
                exprs.append(pl.col(t.label).cast(pl.Float32).alias(f"__label/{t.name}"))
        truth = {t: c for t, c in spec.ground_truth.items() if c in schema}
        exprs += [pl.col(c).cast(pl.Float32).alias(f"__truth/{t}") for t, c in truth.items()]
        out = df.select(exprs)
        # Variable-length outputs (exploded multi-hot ids) cannot share that frame.
        flat = {f.name: df.select(self._id_expr(f, schema)).to_series().to_numpy()
                for f in spec.multi_hot}

        col = lambda name: out.get_column(name).to_numpy()  # noqa: E731
        tables = {name: self._table(tab.fields, n, col, flat) for name, tab in spec.embedding_tables.items()}
        dense = (np.ascontiguousarray(out.select([f"__dense/{f.name}" for f in spec.dense]).to_numpy(),
                                      dtype=np.float32) if spec.dense else np.zeros((n, 0), np.float32))
        labels, masks = {}, {}
        if with_labels:
            labels = {t.name: col(f"__label/{t.name}") for t in spec.tasks}
            for t in spec.tasks:
                space = spec.task_by_name.get(t.space)
                masks[t.name] = np.ones(n, bool) if space is None else labels[space.name] > 0
        return FeatureArrays(n, tables, dense, labels, masks, col("__group"),
                             {t: col(f"__truth/{t}") for t in truth})

    def _table(self, fields: tuple[str, ...], n: int, col, flat: dict[str, np.ndarray]) -> TableArrays:
        feats = [self.spec.feature_by_name[f] for f in fields]
        k = len(feats)
        if not any(isinstance(f, MultiHotFeature) for f in feats):
            ids = np.stack([col(f"__id/{f.name}") for f in feats], axis=1) if k > 1 else col(f"__id/{fields[0]}")
            return TableArrays(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1), None, None)
        lengths = np.stack([col(f"__len/{f.name}") if isinstance(f, MultiHotFeature) else np.ones(n, np.int64)
                            for f in feats], axis=1)                       # [n, k]
        bag_len = lengths.reshape(-1)
        offsets = np.zeros(n * k, np.int64)
        np.cumsum(bag_len[:-1], out=offsets[1:])
        total = int(bag_len.sum())
        values = np.empty(total, np.int64)
        need_weights = any(isinstance(f, MultiHotFeature) and f.pooling == "mean" for f in feats)
        weights = np.ones(total, np.float32) if need_weights else None
        rows = np.arange(n, dtype=np.int64)
        for slot, f in enumerate(feats):
            starts = offsets[rows * k + slot]
            if not isinstance(f, MultiHotFeature):
                values[starts] = col(f"__id/{f.name}")
                continue
            ln = lengths[:, slot]
            v = flat[f.name]
            row_of = np.repeat(rows, ln)
            rank = np.arange(v.size, dtype=np.int64) - np.repeat(np.cumsum(ln) - ln, ln)
            dest = starts[row_of] + rank
            values[dest] = v
            if f.pooling == "mean":
                weights[dest] = (1.0 / ln[row_of]).astype(np.float32)
        return TableArrays(values, offsets, weights)
