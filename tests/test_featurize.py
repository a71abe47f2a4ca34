"""Featurizer output layout, checked against the row-at-a-time hashing path."""
import numpy as np
import polars as pl
import pytest
import torch

from mtrank.features.featurize import FeatureArrays, Featurizer
from mtrank.features.hashing import NULL_ID, hash_value
from mtrank.features.numeric import Moments, NumericStats, pre_standardize_expr
from mtrank.features.spec import parse_spec
from mtrank.pipeline.batch import batch_from_arrays
from tests.conftest import make_frame


def _stats(spec, df):
    return NumericStats.of_frame(df, spec)


def _row_ids(spec, row, field, table):
    buckets = spec.embedding_tables[table].buckets
    v = row[field]
    if spec.feature_by_name[field].kind == "multi_hot":
        return [hash_value(x, table, spec.hash_seed, buckets) for x in (v or [])]
    return hash_value(v, table, spec.hash_seed, buckets)


def _bag_lists(t, rows):
    ends = np.append(t.offsets[1:], t.values.size)
    return [t.values[s:e].tolist() for s, e in zip(t.offsets, ends)]


def test_layout_matches_row_path(spec):
    df = make_frame(spec, 40)
    arr = Featurizer(spec, _stats(spec, df)).transform(df)
    assert arr.rows == 40 and arr.ids.shape == (40, 26) and arr.ids.dtype == np.int64
    rows = list(df.iter_rows(named=True))
    for j, (field, table) in enumerate(spec.id_fields):
        assert arr.ids[:, j].tolist() == [_row_ids(spec, r, field, table) for r in rows], field
    assert set(arr.bags) == {"category", "item_tags"}
    for table, fields in spec.bag_tables.items():
        expected = [_row_ids(spec, r, f, table) for r in rows for f in fields]
        assert _bag_lists(arr.bags[table], 40) == expected
    # shared table: the int64 category_id and the string list of categories hash alike
    cat = spec.embedding_tables["category"]
    assert hash_value(7, "category", spec.hash_seed, cat.buckets) == hash_value("7", "category", spec.hash_seed, cat.buckets)
    # null id and null list
    assert arr.ids[0, [f for f, _ in spec.id_fields].index("user_gender")] == NULL_ID
    tags = arr.bags["item_tags"]
    assert tags.offsets[1] == tags.offsets[2]  # row 1 has a null list -> empty bag


def test_mean_pooling_weights(spec):
    df = make_frame(spec, 30)
    t = Featurizer(spec, _stats(spec, df)).transform(df).bags["category"]
    ends = np.append(t.offsets[1:], t.values.size)
    for s_, e in zip(t.offsets, ends):
        if e > s_:  # mean-pooled bag: equal weights summing to 1
            w = t.weights[s_:e]
            assert np.isclose(w.sum(), 1.0) and np.allclose(w, w[0])


def test_dense_standardised_and_labels_masks(spec):
    df = make_frame(spec, 500)
    stats = _stats(spec, df)
    arr = Featurizer(spec, stats).transform(df, with_eval=True)
    assert arr.dense.shape == (500, 8) and arr.dense.dtype == np.float32 and arr.dense.flags.c_contiguous
    assert np.allclose(arr.dense.mean(0), 0, atol=1e-4) and np.allclose(arr.dense.std(0), 1, atol=1e-3)
    price = df.select(pre_standardize_expr(spec.feature_by_name["price"])).to_series().to_numpy()
    m = stats.moments["price"]
    assert np.allclose(arr.dense[:, 0], (price - m.mean) / m.std, atol=1e-5)
    assert np.array_equal(arr.masks["ctr"], np.ones(500, bool))
    assert np.array_equal(arr.masks["cvr"], df["click"].to_numpy() == 1)
    assert np.array_equal(arr.labels["stay"], df["stay_seconds"].to_numpy())
    assert set(arr.truth) == {"ctr"}


def test_missing_stats_is_an_error(spec):
    with pytest.raises(ValueError, match="numeric statistics missing"):
        Featurizer(spec, NumericStats()).transform(make_frame(spec, 5))


def test_moments_merge_equals_whole():
    x = np.random.default_rng(0).normal(3, 2, 1001)
    df = pl.DataFrame({"a": x})
    spec = parse_spec({"hash_seed": 1, "features": [{"name": "a", "kind": "numeric", "standardize": True}],
                       "tasks": [{"name": "ctr", "label": "click", "type": "binary"}]})
    whole = NumericStats.of_frame(df, spec).moments["a"]
    parts = NumericStats.of_frame(df[:300], spec).merge(NumericStats.of_frame(df[300:], spec)).moments["a"]
    assert parts.count == whole.count == 1001
    assert np.isclose(parts.mean, x.mean()) and np.isclose(parts.std, x.std())
    assert Moments(5, 2.0, 0.0).std == 1.0  # constant column never divides by zero


def _same(a, b):
    assert a.rows == b.rows and np.array_equal(a.ids, b.ids)
    for name in a.bags:
        assert _bag_lists(a.bags[name], a.rows) == _bag_lists(b.bags[name], b.rows), name
        wa, wb = a.bags[name].weights, b.bags[name].weights
        assert (wa is None) == (wb is None) and (wa is None or np.array_equal(wa, wb))
    assert np.array_equal(a.dense, b.dense) and np.array_equal(a.group, b.group)
    for k in a.labels:
        assert np.array_equal(a.labels[k], b.labels[k]) and np.array_equal(a.masks[k], b.masks[k])


def test_slice_take_concat_match_transform_of_rows(spec):
    df = make_frame(spec, 60)
    feat = Featurizer(spec, _stats(spec, df))
    whole = feat.transform(df, with_eval=True)
    parts = [feat.transform(df[a:b], with_eval=True) for a, b in [(0, 16), (16, 45), (45, 60)]]
    _same(FeatureArrays.concat(parts), whole)
    _same(whole.slice(16, 45), parts[1])
    perm = np.random.default_rng(0).permutation(60)
    _same(whole.take(perm), feat.transform(df[perm], with_eval=True))
    batch = batch_from_arrays(whole.slice(0, 16))
    assert batch.size == 16 and torch.equal(batch.dense, torch.from_numpy(whole.dense[:16]))


def test_dictionary_encoded_input_gives_the_same_ids(spec):
    df = make_frame(spec, 40)
    feat = Featurizer(spec, _stats(spec, df))
    table = df.to_arrow()
    enc = table
    for i, name in enumerate(table.column_names):
        col = table.column(name)
        if str(col.type) in ("large_string", "string"):
            enc = enc.set_column(i, name, col.dictionary_encode())
    assert any(str(t).startswith("dictionary") for t in enc.schema.types)
    _same(feat.transform(enc, with_eval=True), feat.transform(table, with_eval=True))


def test_bucketized_numeric_becomes_an_id_column():
    spec = parse_spec({"hash_seed": 1, "features": [
        {"name": "age", "kind": "numeric", "fill": 0.0, "boundaries": [1.0, 7.0, 30.0], "dim": 4},
        {"name": "x", "kind": "numeric", "clip": [0, 10], "standardize": True}],
        "tasks": [{"name": "ctr", "label": "click", "type": "binary"}]})
    df = pl.DataFrame({"age": [0.5, 1.0, 6.9, 7.0, 29.0, 30.0, 1e6, None], "x": [1.0] * 8,
                       "click": [0] * 8})
    arr = Featurizer(spec, NumericStats.of_frame(df, spec)).transform(df)
    assert spec.id_fields == (("age", "age"),) and arr.dense.shape == (8, 1)
    assert arr.ids[:, 0].tolist() == [1, 2, 2, 3, 3, 4, 4, 1]  # null filled with 0.0 -> first bucket
