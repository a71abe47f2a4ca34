"""Can a model trained with one FeatureSpec keep training under another? (warm starts)

Stable hashing makes yesterday's ids mean the same thing today, so a model can continue, as long as
every table hashes the same way into the same number of rows and every input keeps its meaning.
Tables whose bucket count or hash seed changed can be re-initialised (their rows now mean something
else); anything that changes the inputs' shape or meaning (features, transforms, dims, tasks) cannot.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mtrank.features.spec import FeatureSpec


@dataclass
class SpecChanges:
    tables: dict[str, str] = field(default_factory=dict)   # table -> why its rows changed meaning
    blocking: list[str] = field(default_factory=list)      # changes no warm start can bridge

    @property
    def compatible(self) -> bool:
        return not self.tables and not self.blocking


def _feature_shape(f) -> dict:
    """A feature's definition minus its table's rows and id options (compared per table: a bucket or
    rare-row change is a table change; l2 and dropout only change how training goes on) and its
    serving value (which training never reads)."""
    d = f.model_dump(mode="json")
    for k in ("buckets", "min_count", "l2", "dropout", "serve_value"):
        d.pop(k, None)
    return d


def compare_specs(old: FeatureSpec, new: FeatureSpec) -> SpecChanges:
    ch = SpecChanges()
    old_f = {f.name: f for f in old.features}
    new_f = {f.name: f for f in new.features}
    if list(old_f) != list(new_f):
        added, removed = sorted(set(new_f) - set(old_f)), sorted(set(old_f) - set(new_f))
        ch.blocking.append(f"features changed (added {added or 'none'}, removed {removed or 'none'}"
                           + (", order changed" if not added and not removed else "") + ")")
    for name in old_f.keys() & new_f.keys():
        if _feature_shape(old_f[name]) != _feature_shape(new_f[name]):
            ch.blocking.append(f"feature {name!r} changed its definition (kind, table, dim, pooling or transform)")
    if [t.model_dump() for t in old.tasks] != [t.model_dump() for t in new.tasks]:
        ch.blocking.append("tasks changed")
    old_t, new_t = old.embedding_tables, new.embedding_tables
    for name in old_t.keys() & new_t.keys():
        a, b = old_t[name], new_t[name]
        if a.dim != b.dim:
            ch.blocking.append(f"table {name!r}: dim {a.dim} -> {b.dim}")
        elif a.buckets != b.buckets:
            ch.tables[name] = f"buckets {a.buckets:,} -> {b.buckets:,}"
        elif a.rows != b.rows:
            ch.tables[name] = (f"min_count {a.min_count} -> {b.min_count} ({'adds' if b.rows > a.rows else 'removes'} "
                               "the shared rare row)")
        elif old.hash_seed != new.hash_seed:
            ch.tables[name] = f"hash_seed {old.hash_seed} -> {new.hash_seed} (every id maps to another row)"
    for name in sorted(new_t.keys() - old_t.keys()):
        ch.blocking.append(f"table {name!r} is new")
    return ch
