"""Serving rows conformed to the column types the model was trained on.

Rows that reach a registered model through pandas or JSON lose their types: an integer id column
with one null becomes float64, a null list becomes NaN, a JSON id may arrive as a string. Hashing
depends on the value's type (id 7 hashes as "7", 7.0 would not even be accepted), so every feature
column is cast back to the Arrow type of the training logs, which is saved with the model. A cast
that would change a value (7.5 as an id, "abc" as a count) is an error naming the column.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from mtrank.features.rules import NULL, WRONG_TYPE, BadInputError
from mtrank.features.spec import FeatureSpec, MultiHotFeature, NumericFeature


def plain_type(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column is served by its value type."""
    return t.value_type if pa.types.is_dictionary(t) else t


def is_list_type(t: pa.DataType) -> bool:
    """Every Arrow list layout a writer may choose for a multi-valued column."""
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) \
        or pa.types.is_large_list_view(t) or pa.types.is_fixed_size_list(t)


def serving_schema(spec: FeatureSpec, trained: pa.Schema | None) -> pa.Schema:
    """The spec's feature columns, in spec order, typed as in the training logs. Without the training
    schema (a model saved before it was kept), types follow the feature kind: ids as given when they
    are strings or integers (both hash alike), else as int64; lists of int64; numbers as float64."""
    fields = []
    for f in spec.features:
        if f.name in spec.served_values:   # set by serving (with_served_values), never sent
            continue
        if trained is not None and trained.get_field_index(f.name) >= 0:
            fields.append(pa.field(f.name, plain_type(trained.field(f.name).type), nullable=True))
        elif isinstance(f, NumericFeature):
            fields.append(pa.field(f.name, pa.float64()))
        elif isinstance(f, MultiHotFeature):
            fields.append(pa.field(f.name, pa.list_(pa.int64())))
        else:
            fields.append(pa.field(f.name, pa.int64(), metadata={_ANY_ID: b"1"}))
    return pa.schema(fields)


_ANY_ID = b"mtrank.any_id"   # a field whose training type is unknown: any string or integer id is kept


def _kept_as_given(col: pa.ChunkedArray, f: pa.Field) -> bool:
    t = plain_type(col.type)
    return bool(f.metadata and _ANY_ID in f.metadata) and (
        pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t))


def conform(table: pa.Table, schema: pa.Schema, source: str = "request") -> pa.Table:
    """`table`'s columns of `schema`, each cast (safely: no value may change) to its type."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise BadInputError(source, missing[0], "missing_column",
                            f"the model needs the feature column(s) {', '.join(missing)}; it reads "
                            f"{', '.join(schema.names)}")
    columns = []
    for f in schema:
        col = table.column(f.name)
        if col.type == f.type or _kept_as_given(col, f):
            columns.append(col)
        elif pa.types.is_null(col.type):           # every value null: JSON gives no type at all
            columns.append(pa.nulls(len(col), f.type))
        else:
            try:
                columns.append(pc.cast(col, f.type, safe=True))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise BadInputError(source, f.name, WRONG_TYPE,
                                    f"{col.type} values cannot be read as {f.type}, the type the model was "
                                    f"trained on, without changing them ({str(e).splitlines()[0]})") from None
    return pa.Table.from_arrays(columns, names=schema.names)


def with_served_values(data: pa.Table | pa.RecordBatch, spec: FeatureSpec) -> pa.Table | pa.RecordBatch:
    """`data` with every feature that has a `serve_value` set to it on every row: added, or replacing
    the column a request or candidate file carries (e.g. the logged slot of a logged day)."""
    for name, value in spec.served_values.items():
        const = pa.repeat(value, data.num_rows)
        i = data.schema.get_field_index(name)
        data = data.set_column(i, name, const) if i >= 0 else data.append_column(name, const)
    return data


def check_serving_nulls(table: pa.Table, spec: FeatureSpec, source: str = "request") -> None:
    """A null numeric without a `fill` has no value the model could use (training rejects such rows):
    an error naming the column and the first rows, instead of a silent NaN score."""
    for f in spec.features:
        if isinstance(f, NumericFeature) and f.fill is None and f.name in table.column_names:
            col = table.column(f.name)
            bad = pc.is_null(col, nan_is_null=True) if pa.types.is_floating(col.type) else pc.is_null(col)
            n = pc.sum(bad).as_py() or 0
            if n:
                rows = pc.indices_nonzero(bad.combine_chunks() if hasattr(bad, "combine_chunks") else bad)
                first = ", ".join(str(i) for i in rows.to_pylist()[:5])
                raise BadInputError(source, f.name, NULL, f"null in row(s) {first}{' …' if n > 5 else ''}, and "
                                    "the spec gives this feature no `fill` (training rejects such rows): send a "
                                    "value, or retrain with a `fill`", count=n)
