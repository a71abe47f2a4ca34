"""Stable hashing: pinned values, agreement of the vectorised and row paths, cross-process."""
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrank.features.hashing import (NULL_ID, CollisionStats, hash_expr, hash_value, table_collisions,
                              table_seed)
from mtrank.features.spec import load_spec

SEED = 20261121


def test_xxh64_reference_vectors():
    # Published XXH64 test vectors: if a dependency ever changes the algorithm, this fails.
    assert xxhash.xxh64_intdigest(b"", 0) == 0xEF46DB3751D8E999
    assert xxhash.xxh64_intdigest(b"abc", 0) == 0x44BC2CF5AD770999
    got = pl.DataFrame({"s": ["", "abc"]}).select(pl.col("s").nchash.xxhash64(seed=0)).to_series().to_list()
    assert got == [0xEF46DB3751D8E999, 0x44BC2CF5AD770999]


# (value, table, buckets) -> id. Pinned: any change here invalidates every trained model.
GOLDEN = [
    ("u123", "user_id", 1048576, 633448),
    (123, "category", 4096, 1995),
    ("123", "category", 4096, 1995),
    ("", "device", 16, 12),
    ("héllo", "city", 1024, 139),
    (-7, "item_id", 524288, 132498),
    (2**62, "item_id", 524288, 388295),
]


def test_golden_ids_row_path():
    assert table_seed("user_id", SEED) == 12601195412480615302
    for value, table, buckets, expected in GOLDEN:
        assert hash_value(value, table, SEED, buckets) == expected, (value, table)


def test_golden_ids_vectorised_path():
    for value, table, buckets, expected in GOLDEN:
        s = pl.Series("x", [value, None])
        ids = pl.DataFrame({"x": s}).select(hash_expr(pl.col("x"), s.dtype, table_seed(table, SEED), buckets))
        assert ids.to_series().to_list() == [expected, NULL_ID]


def test_int_and_string_ids_hash_alike_and_tables_differ():
    seed = table_seed("item_id", SEED)
    ints = pl.DataFrame({"x": pl.Series([5, 17, 123456789], dtype=pl.Int64)})
    strs = pl.DataFrame({"x": ["5", "17", "123456789"]})
    a = ints.select(hash_expr(pl.col("x"), pl.Int64, seed, 1000)).to_series().to_list()
    b = strs.select(hash_expr(pl.col("x"), pl.String, seed, 1000)).to_series().to_list()
    assert a == b
    other = strs.select(hash_expr(pl.col("x"), pl.String, table_seed("brand_id", SEED), 1000)).to_series()
    assert other.to_list() != b  # another table is another namespace


def test_unhashable_types_are_rejected():
    with pytest.raises(TypeError):
        hash_value(1.5, "t", SEED, 10)
    with pytest.raises(TypeError):
        hash_value(True, "t", SEED, 10)
    with pytest.raises(TypeError):
        pl.DataFrame({"x": [1.5]}).select(hash_expr(pl.col("x"), pl.Float64, 1, 10))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=1, max_size=30),
       buckets=st.integers(min_value=2, max_value=2**31), table=st.text(min_size=1, max_size=8))
def test_vectorised_equals_row_path_strings(values, buckets, table):
    s = pl.Series("x", values, dtype=pl.String)
    vec = pl.DataFrame({"x": s}).select(hash_expr(pl.col("x"), pl.String, table_seed(table, SEED), buckets))
    assert vec.to_series().to_list() == [hash_value(v, table, SEED, buckets) for v in values]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), min_size=1, max_size=30),
       buckets=st.integers(min_value=2, max_value=2**20))
def test_vectorised_equals_row_path_ints(values, buckets):
    s = pl.Series("x", values, dtype=pl.Int64)
    vec = pl.DataFrame({"x": s}).select(hash_expr(pl.col("x"), pl.Int64, table_seed("t", SEED), buckets))
    ids = vec.to_series().to_list()
    assert ids == [hash_value(v, "t", SEED, buckets) for v in values]
    assert all(0 <= i < buckets for i in ids)
    assert all((i == NULL_ID) == (v is None) for i, v in zip(ids, values))


def test_same_ids_in_a_fresh_process_with_another_hash_seed():
    code = ("from features.hashing import hash_value;"
            "print([hash_value(v, t, 20261121, b) for v, t, b, _ in __import__('tests.test_hashing', "
            "fromlist=['GOLDEN']).GOLDEN])")
    outs = set()
    for pyhashseed in ("0", "12345"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": pyhashseed, "PATH": "/usr/bin:/bin"}, cwd=".")
        outs.add(r.stdout.strip())
    assert outs == {str([g[-1] for g in GOLDEN])}


def test_ids_spread_over_buckets():
    ids = pl.DataFrame({"x": pl.Series(np.arange(200_000))}).select(
        hash_expr(pl.col("x"), pl.Int64, table_seed("t", SEED), 1024)).to_series().to_numpy()
    counts = np.bincount(ids, minlength=1024)
    assert counts[0] == 0  # null bucket stays empty for non-null values
    expected = 200_000 / 1023
    assert counts[1:].min() > 0.7 * expected and counts[1:].max() < 1.3 * expected


def test_collision_rate_matches_birthday_estimate():
    spec = load_spec()
    n = 20_000
    lf = pl.LazyFrame({"user_id": [f"u{i}" for i in range(n)] * 2})  # duplicates are one value
    lf = lf.with_columns(*[pl.lit(None, pl.String).alias(f.name) for f in spec.categorical if f.name != "user_id"],
                         *[pl.lit(None, pl.List(pl.String)).alias(f.name) for f in spec.multi_hot])
    stats = table_collisions(lf, spec)
    user = stats["user_id"]
    assert user.distinct_values == n
    m = 1048576 - 1
    expected_ids = m * (1 - (1 - 1 / m) ** n)  # expected occupied buckets
    assert abs(user.distinct_ids - expected_ids) < 40
    assert 0 < user.collision_rate < 0.02
    assert stats["device"].distinct_values == 0 and stats["device"].collision_rate == 0.0
    assert CollisionStats("t", 10, 10, 5).collision_rate == 0.5
