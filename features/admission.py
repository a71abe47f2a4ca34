"""Frequency admission of ids: how often each row of a table was looked up in the training window.

A table with `min_count` > 1 gives its own embedding row only to ids seen at least `min_count`
times in the training window; the others (rarer ids, and ids never seen: new users at evaluation
and scoring) share the table's extra 'rare' row. Counts are data statistics fitted on the window
like the numeric statistics, one int64 array per table (a bincount over hashed ids, id-matrix
columns and multi-hot bag values together); the admitted set (one bool per row) lives in the model
(`FusedEmbeddings.set_admission`), so evaluation, scoring and the pyfunc apply it identically.

Counts are per hashed id, not per raw value: values that collide share a row and so a count.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from mtrank.features.hashing import NULL_ID, hash_expr, table_seed
from mtrank.features.spec import FeatureSpec, MultiHotFeature, NumericFeature


def admission_tables(spec: FeatureSpec) -> list[str]:
    """Tables with frequency admission (min_count > 1), in spec order."""
    return [t.name for t in spec.embedding_tables.values() if t.min_count > 1]


@dataclass
class IdCounts:
    """table -> int64 [buckets] lookups per id (index 0 = null)."""

    counts: dict[str, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def of_arrays(arrays, spec: FeatureSpec, tables: list[str] | None = None) -> "IdCounts":
        """Counts of featurized rows (`FeatureArrays`): every id column and bag value of each table."""
        tabs = spec.embedding_tables
        names = admission_tables(spec) if tables is None else tables
        out = {}
        for name in names:
            cols = [j for j, (_, t) in enumerate(spec.id_fields) if t == name]
            parts = [arrays.ids[:, cols].reshape(-1)] if cols else []
            if name in arrays.bags:
                parts.append(arrays.bags[name].values)
            ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            out[name] = np.bincount(ids, minlength=tabs[name].buckets).astype(np.int64)
        return IdCounts(out)

    @staticmethod
    def of_frame(frame: pl.LazyFrame | pl.DataFrame, spec: FeatureSpec, tables: list[str] | None = None) -> "IdCounts":
        """Counts of raw rows (hashed here, as the featurizer does), e.g. for `mtrank validate`."""
        lf = frame.lazy()
        schema = lf.collect_schema()
        tabs = spec.embedding_tables
        names = tables if tables is not None else [
            t.name for t in tabs.values()
            if not any(isinstance(spec.feature_by_name[f], NumericFeature) for f in t.fields)]
        out = {}
        for name in names:
            tab, seed = tabs[name], table_seed(name, spec.hash_seed)
            parts = []
            for f in (spec.feature_by_name[x] for x in tab.fields):
                col, dtype = pl.col(f.name), schema[f.name]
                if isinstance(f, MultiHotFeature):
                    col, dtype = col.explode(empty_as_null=False, keep_nulls=False), dtype.inner
                parts.append(lf.select(hash_expr(col, dtype, seed, tab.buckets).alias("id")))
            ids = pl.concat(parts).collect().get_column("id").to_numpy() if parts else np.zeros(0, np.int64)
            out[name] = np.bincount(ids, minlength=tab.buckets).astype(np.int64)
        return IdCounts(out)

    def merge(self, other: "IdCounts") -> "IdCounts":
        names = dict.fromkeys([*self.counts, *other.counts])
        return IdCounts({n: self.counts[n] + other.counts[n] if n in self.counts and n in other.counts
                         else (self.counts.get(n) if n in self.counts else other.counts[n]).copy() for n in names})

    def admitted(self, spec: FeatureSpec) -> dict[str, np.ndarray]:
        """table -> bool [buckets]: the ids that keep their own row (null always does)."""
        tabs = spec.embedding_tables
        out = {}
        for name, c in self.counts.items():
            ok = c >= tabs[name].min_count
            ok[NULL_ID] = True
            out[name] = ok
        return out

    def summary(self, spec: FeatureSpec, min_count: dict[str, int] | None = None) -> dict[str, dict]:
        """Per table: ids seen, ids under min_count (sharing the rare row) and the lookups they make."""
        tabs = spec.embedding_tables
        out = {}
        for name, c in self.counts.items():
            k = (min_count or {}).get(name, tabs[name].min_count)
            seen = c[1:] > 0
            rare = seen & (c[1:] < k)
            out[name] = {"min_count": k, "ids_seen": int(seen.sum()), "ids_rare": int(rare.sum()),
                         "ids_admitted": int((c[1:] >= k).sum()) if k > 1 else int(seen.sum()),
                         "lookups": int(c[1:].sum()), "lookups_rare": int(c[1:][rare].sum()),
                         "ids_once": int((c[1:] == 1).sum())}
        return out


def format_summary(summary: dict[str, dict]) -> list[str]:
    lines = [f"{'table':<24}{'min_count':>10}{'ids seen':>10}{'rare ids':>10}{'rare lookups':>14}{'seen once':>11}"]
    for name, s in summary.items():
        share = s["lookups_rare"] / s["lookups"] if s["lookups"] else 0.0
        lines.append(f"{name:<24}{s['min_count']:>10}{s['ids_seen']:>10,}{s['ids_rare']:>10,}"
                     f"{s['lookups_rare']:>8,} {share:>5.1%}{s['ids_once']:>11,}")
    return lines
