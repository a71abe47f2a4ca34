"""Raw columns -> model-ready numpy arrays, for a whole chunk of rows at once.

Layout: every single-valued id field (categoricals, bucketized numerics) is one column of an int64
id matrix [rows, n_id_fields] (`spec.id_fields` order), so a model can look all of them up in one
fused call and a shuffle moves each row with one gather. Multi-hot fields use the EmbeddingBag
convention per table: the k multi-hot fields of a table form k bags per row (bag = row * k + slot)
with offsets; mean-pooled bags carry per-id weights 1/len so one 'sum' lookup pools every field.
Null lists are empty bags; null ids are NULL_ID.

Speed: string columns read as Arrow dictionaries are hashed once per distinct value and gathered
by index, so the cost per row is a gather, not a hash; every other hash runs in one parallel
polars round-trip per chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from mtrank.features.hashing import NULL_ID, group_key_expr, hash_expr, table_seed
from mtrank.features.numeric import NumericStats, bucket_expr, dense_exprs
from mtrank.features.spec import CategoricalFeature, FeatureSpec, MultiHotFeature, NumericFeature


@dataclass
class TableArrays:
    """Pooled bags of one table's multi-hot fields."""

    values: np.ndarray               # int64 [n_ids]
    offsets: np.ndarray              # int64 [rows * k] bag starts
    weights: np.ndarray | None       # float32 [n_ids] per-id pooling weights; None: all 1

    def bag_lengths(self, rows: int) -> np.ndarray:
        """[rows, k] ids per bag."""
        return np.diff(np.append(self.offsets, self.values.size)).reshape(rows, -1)

    def slice(self, start: int, stop: int, rows: int) -> "TableArrays":
        k = self.offsets.size // rows
        lo = int(self.offsets[start * k]) if start < rows else self.values.size
        hi = int(self.offsets[stop * k]) if stop < rows else self.values.size
        w = None if self.weights is None else self.weights[lo:hi]
        return TableArrays(self.values[lo:hi], self.offsets[start * k: stop * k] - lo, w)

    def take(self, perm: np.ndarray, rows: int) -> "TableArrays":
        lengths = self.bag_lengths(rows)
        row_len = lengths.sum(1)
        row_start = self.offsets[:: lengths.shape[1]]
        new_len = row_len[perm]
        new_start = np.cumsum(new_len) - new_len
        src = np.arange(int(new_len.sum()), dtype=np.int64) + np.repeat(row_start[perm] - new_start, new_len)
        return TableArrays(self.values[src], _starts(lengths[perm].reshape(-1)),
                           None if self.weights is None else self.weights[src])

    @staticmethod
    def concat(parts: list["TableArrays"]) -> "TableArrays":
        base = np.cumsum([0] + [p.values.size for p in parts[:-1]])
        return TableArrays(np.concatenate([p.values for p in parts]),
                           np.concatenate([p.offsets + b for p, b in zip(parts, base)]),
                           None if parts[0].weights is None else np.concatenate([p.weights for p in parts]))


@dataclass
class FeatureArrays:
    rows: int
    ids: np.ndarray                  # int64 [rows, n_id_fields], columns = spec.id_fields
    bags: dict[str, TableArrays]     # table -> bags of its multi-hot fields
    dense: np.ndarray                # float32 [rows, n_dense]
    labels: dict[str, np.ndarray]    # task -> float32 [rows]
    masks: dict[str, np.ndarray]     # task -> bool [rows]: row belongs to the task's training space
    group: np.ndarray | None         # int64 [rows] GAUC group key (hashed user); evaluation reads only
    truth: dict[str, np.ndarray]     # task -> float32 [rows], evaluation reads with truth columns only

    def _rowwise(self, f, rows: int, bags: dict[str, TableArrays]) -> "FeatureArrays":
        """Apply a row selection `f` to every row-aligned array; bags are selected by the caller."""
        return FeatureArrays(rows, f(self.ids), bags, f(self.dense), {k: f(v) for k, v in self.labels.items()},
                             {k: f(v) for k, v in self.masks.items()},
                             None if self.group is None else f(self.group), {k: f(v) for k, v in self.truth.items()})

    def slice(self, start: int, stop: int) -> "FeatureArrays":
        stop = min(stop, self.rows)
        return self._rowwise(lambda a: a[start:stop], stop - start,
                             {k: t.slice(start, stop, self.rows) for k, t in self.bags.items()})

    def take(self, perm: np.ndarray) -> "FeatureArrays":
        return self._rowwise(lambda a: a[perm], perm.size,
                             {k: t.take(perm, self.rows) for k, t in self.bags.items()})

    @staticmethod
    def concat(parts: list["FeatureArrays"]) -> "FeatureArrays":
        if len(parts) == 1:
            return parts[0]
        cat = np.concatenate
        p0 = parts[0]
        return FeatureArrays(
            sum(p.rows for p in parts), cat([p.ids for p in parts]),
            {k: TableArrays.concat([p.bags[k] for p in parts]) for k in p0.bags},
            cat([p.dense for p in parts]), {k: cat([p.labels[k] for p in parts]) for k in p0.labels},
            {k: cat([p.masks[k] for p in parts]) for k in p0.masks},
            None if p0.group is None else cat([p.group for p in parts]),
            {k: cat([p.truth[k] for p in parts]) for k in p0.truth})


def _pl_dtype(arr: pa.Array) -> pl.DataType:
    return pl.from_arrow(arr.slice(0, 0)).dtype


def _starts(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(lengths.size, np.int64)
    np.cumsum(lengths[:-1], out=out[1:])
    return out


class Featurizer:
    """A FeatureSpec with its fitted numeric statistics: everything needed to hash and transform."""

    def __init__(self, spec: FeatureSpec, stats: NumericStats | None = None):
        self.spec, self.stats = spec, stats or NumericStats()
        self._missing = self.stats.missing(spec)
        # dense columns in order (a piecewise-linear feature has several): built once, edges fitted once
        self._dense = [] if self._missing else [
            e.alias(f"__dense/{f.name}/{i}") for f in spec.dense for i, e in enumerate(dense_exprs(f, self.stats))]
        self._hashing: dict[str, tuple[int, int]] = {  # field -> (table seed, buckets)
            f: (table_seed(t.name, spec.hash_seed), t.buckets) for t in spec.embedding_tables.values() for f in t.fields}

    def fingerprint(self) -> str:
        """Identifies the arrays `transform` produces: the spec and every fitted statistic. A cache of
        featurized rows is valid exactly while this is unchanged (extend it with any new fitted state)."""
        import hashlib

        return hashlib.sha256((self.spec.fingerprint() + self.stats.to_json()).encode()).hexdigest()

    def transform(self, data: pa.Table | pa.RecordBatch | pl.DataFrame, with_labels: bool = True,
                  with_eval: bool = False) -> FeatureArrays:
        """Arrays for every row; `with_eval` adds the GAUC group key and ground-truth columns."""
        if self._missing:
            raise ValueError(f"numeric statistics missing for standardized or piecewise-linear features: "
                             f"{self._missing}")
        if isinstance(data, pl.DataFrame):
            data = data.to_arrow()
        batches = [b for b in data.to_batches() if b.num_rows] if isinstance(data, pa.Table) else [data]
        batches = batches or [pa.RecordBatch.from_pylist([], schema=data.schema)]
        return FeatureArrays.concat([self._transform(b, with_labels, with_eval) for b in batches])

    # ------------------------------------------------------------------------------------------
    def _hash_query(self, arr: pa.Array, field: str) -> tuple[pl.LazyFrame, np.ndarray | None]:
        """A query hashing `arr` (its dictionary only, when dictionary-encoded) + indices to gather."""
        seed, buckets = self._hashing[field]
        idx = None
        if pa.types.is_dictionary(arr.type):
            arr, idx = arr.dictionary, arr.indices
            idx = (pc.fill_null(idx, len(arr)) if idx.null_count else idx).to_numpy()  # null -> appended NULL_ID
        s = pl.from_arrow(arr)
        return s.to_frame("v").lazy().select(hash_expr(pl.col("v"), s.dtype, seed, buckets)), idx

    def _transform(self, rb: pa.RecordBatch, with_labels: bool, with_eval: bool) -> FeatureArrays:
        spec, n = self.spec, rb.num_rows
        lengths: dict[str, np.ndarray] = {}   # multi-hot field -> ids per row
        plain: dict[str, pa.Array] = {}       # row-aligned columns for the main query
        exprs: list[pl.Expr] = []
        side: list[tuple[str, pl.LazyFrame, np.ndarray | None]] = []  # dictionaries, multi-hot values
        for f in spec.features:
            if isinstance(f, NumericFeature):
                plain[f.name] = rb.column(f.name)
                if f.bucketized:
                    exprs.append(bucket_expr(f).alias(f"__id/{f.name}"))
                continue
            arr = rb.column(f.name)
            if isinstance(f, MultiHotFeature):
                lengths[f.name] = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
                side.append((f.name, *self._hash_query(pc.list_flatten(arr), f.name)))
            elif pa.types.is_dictionary(arr.type):
                side.append((f.name, *self._hash_query(arr, f.name)))
            else:
                seed, buckets = self._hashing[f.name]
                plain[f.name] = arr
                exprs.append(hash_expr(pl.col(f.name), _pl_dtype(arr), seed, buckets).alias(f"__id/{f.name}"))
        exprs += self._dense
        if with_labels:
            for t in spec.tasks:
                plain[t.label] = rb.column(t.label)
                exprs.append(pl.col(t.label).cast(pl.Float32).alias(f"__label/{t.name}"))
        truth: dict[str, str] = {}
        if with_eval and spec.group_key:
            g = rb.column(spec.group_key)
            if pa.types.is_dictionary(g.type):
                g = g.dictionary_decode()
            plain[spec.group_key] = g
            exprs.append(group_key_expr(pl.col(spec.group_key), _pl_dtype(g), spec.hash_seed).alias("__group"))
        if with_eval:
            truth = {t: c for t, c in spec.ground_truth.items() if c in rb.schema.names}
            for t, c in truth.items():
                plain[c] = rb.column(c)
                exprs.append(pl.col(c).cast(pl.Float32).alias(f"__truth/{t}"))
        main = pl.from_arrow(pa.table(plain)).lazy().select(exprs)
        out, *hashed = pl.collect_all([main] + [q for _, q, _ in side])  # one parallel round-trip
        col = lambda name: out.get_column(name).to_numpy()  # noqa: E731
        ids = {name[5:]: col(name) for name in out.columns if name.startswith("__id/")}
        for (field, _, idx), h in zip(side, hashed):
            v = h.to_series().to_numpy()
            ids[field] = v if idx is None else np.append(v, NULL_ID)[idx]

        id_matrix = np.empty((n, len(spec.id_fields)), np.int64)
        for j, (field, _) in enumerate(spec.id_fields):
            id_matrix[:, j] = ids[field]
        bags = {table: self._bags(fields, n, ids, lengths) for table, fields in spec.bag_tables.items()}
        dense = (np.ascontiguousarray(out.select([e.meta.output_name() for e in self._dense]).to_numpy(),
                                      dtype=np.float32) if spec.dense else np.zeros((n, 0), np.float32))
        labels, masks = {}, {}
        if with_labels:
            labels = {t.name: col(f"__label/{t.name}") for t in spec.tasks}
            for t in spec.tasks:
                space = spec.task_by_name.get(t.space)
                masks[t.name] = np.ones(n, bool) if space is None else labels[space.name] > 0
        return FeatureArrays(n, id_matrix, bags, dense, labels, masks, col("__group") if with_eval and spec.group_key else None,
                             {t: col(f"__truth/{t}") for t in truth})

    def _bags(self, fields: tuple[str, ...], n: int, ids: dict[str, np.ndarray],
              lengths: dict[str, np.ndarray]) -> TableArrays:
        feats = [self.spec.feature_by_name[f] for f in fields]
        k = len(feats)
        lens = np.stack([lengths[f] for f in fields], axis=1)       # [n, k]
        offsets = _starts(lens.reshape(-1))
        values = np.empty(int(lens.sum()), np.int64)
        weights = np.ones(values.size, np.float32) if any(f.pooling == "mean" for f in feats) else None
        starts_all = offsets.reshape(n, k)
        for slot, f in enumerate(feats):
            ln = lens[:, slot]
            dest = np.repeat(starts_all[:, slot] - (np.cumsum(ln) - ln), ln) + np.arange(int(ln.sum()), dtype=np.int64)
            values[dest] = ids[f.name]
            if f.pooling == "mean":
                weights[dest] = np.repeat((1.0 / np.maximum(ln, 1)).astype(np.float32), ln)
        return TableArrays(values, offsets, weights)
