"""Streaming reader on real Parquet files: accounting, bad rows, schema errors, sharding, shuffle."""
import datetime as dt
import os

import numpy as np
import polars as pl
import pytest

from mtrank.features.featurize import Featurizer
from mtrank.features.rules import BadInputError
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.reader import ImpressionReader, RowAccounting, fit_numeric_stats
from tests.conftest import make_frame

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)


def write_day(root, day, frames, row_group_size=64):
    part = root / f"dt={day}"
    part.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        f.write_parquet(part / f"part-{i:05d}.parquet", row_group_size=row_group_size)


def unique_rows(spec, n, seed, prefix):
    return make_frame(spec, n, seed).with_columns(
        pl.format("{}-{}", pl.lit(prefix), pl.int_range(n)).alias(spec.request_id))


@pytest.fixture
def clean_logs(tmp_path, spec):
    root = tmp_path / "logs"
    write_day(root, D1, [unique_rows(spec, 300, 1, "a"), unique_rows(spec, 200, 2, "b")])
    write_day(root, D2, [unique_rows(spec, 250, 3, "c")])
    return root


def featurizer_for(spec, window):
    return Featurizer(spec, fit_numeric_stats(ImpressionReader(window, spec, progress=False)))


def test_batches_cover_every_row_once(clean_logs, spec):
    window = open_window(clean_logs, spec)
    assert window.rows == 750 and len(window.files) == 3
    reader = ImpressionReader(window, spec, featurizer_for(spec, window), batch_size=64, progress=False)
    sizes = [b.size for b in reader.batches()]
    assert sum(sizes) == 750 and all(s == 64 for s in sizes[:-1])
    acc = reader.accounting
    assert acc.rows_read == acc.rows_accepted == 750 and acc.balanced
    b = next(reader.batches())
    assert b.dense.shape == (64, 8) and b.labels["ctr"].shape == (64,)
    assert b.ids.shape == (64, 26) and b.bags["category"].offsets.shape == (64,)


def test_date_window_filters_days(clean_logs, spec):
    assert open_window(clean_logs, spec, D2, D2).rows == 250
    assert open_window(clean_logs, spec, D1, D1).rows == 500


def plant_bad_rows(spec, n=400):
    df = make_frame(spec, n, seed=5).with_columns(pl.format("r{}", pl.int_range(n)).alias(spec.request_id))
    click = df["click"].to_numpy().copy()
    clicked = [i for i in np.flatnonzero(click == 1) if i >= 16]  # rows 10..15 get their own problems
    unclicked = [i for i in np.flatnonzero(click == 0) if i >= 16]
    plan = {  # row -> (column, value); each row broken exactly once
        int(unclicked[0]): ("conversion", 1), int(unclicked[1]): ("cart", 1),
        int(unclicked[2]): ("stay_seconds", 5.0), int(clicked[0]): ("stay_seconds", -3.0),
        10: ("price", float("nan")), 11: ("price", float("inf")), 12: ("price", None),
        13: ("click", None), 14: ("user_id", None), 15: ("collect", 2),
    }
    rows = {c: df[c].to_list() for c in {c for c, _ in plan.values()}}
    for r, (c, v) in plan.items():
        rows[c][r] = v
    df = df.with_columns([pl.Series(c, v, dtype=df.schema[c]) for c, v in rows.items()])
    expected = {"conversion:outside_space": 1, "cart:outside_space": 1, "stay_seconds:outside_space": 1,
                "stay_seconds:negative": 1, "price:non_finite": 2, "price:null": 1, "click:null": 1,
                "user_id:null": 1, "collect:not_binary": 1}
    return df, expected


@pytest.fixture
def bad_logs(tmp_path, spec):
    df, expected = plant_bad_rows(spec)
    root = tmp_path / "bad"
    write_day(root, D1, [df])
    return root, df, expected


def test_fail_mode_names_file_column_rule_and_count(bad_logs, spec):
    root, _, expected = bad_logs
    window = open_window(root, spec)
    with pytest.raises(BadInputError) as e:
        for _ in ImpressionReader(window, spec, progress=False).frames():
            pass
    err = e.value
    assert err.file.endswith("part-00000.parquet") and "dt=2026-11-01" in err.file
    assert f"{err.column}:{err.rule}" in expected and err.count == expected[f"{err.column}:{err.rule}"]
    assert "other problem(s)" in str(err) and err.file in str(err)


def test_quarantine_mode_counts_and_sets_rows_aside(bad_logs, spec, tmp_path):
    root, df, expected = bad_logs
    qspec = spec.model_copy(update={"on_bad_row": "quarantine"})
    window = open_window(root, qspec)
    qdir = tmp_path / "quarantine"
    reader = ImpressionReader(window, qspec, quarantine_dir=qdir, progress=False, chunk_rows=128)
    accepted = sum(f.num_rows for f in reader.frames())
    acc = reader.accounting
    assert dict(acc.rejected) == expected
    assert acc.rows_read == 400 == accepted + acc.rows_rejected and acc.balanced
    q = pl.read_parquet(sorted(qdir.rglob("*.parquet")))
    assert q.height == sum(expected.values())
    assert q["_reject_reason"].value_counts().sort("_reject_reason").rows() == sorted(expected.items())
    assert q["_source_file"].str.ends_with("part-00000.parquet").all()
    # the stats pass and batches see exactly the accepted rows
    feat = Featurizer(qspec, fit_numeric_stats(reader))
    batches = ImpressionReader(window, qspec, feat, quarantine_dir=qdir, batch_size=50, progress=False)
    assert sum(b.size for b in batches.batches()) == accepted == 400 - sum(expected.values())


def test_sharding_is_disjoint_and_complete(clean_logs, spec):
    window = open_window(clean_logs, spec)
    seen, total = [], RowAccounting()
    for rank in range(3):
        r = ImpressionReader(window, spec, rank=rank, world_size=3, progress=False)
        seen += [x for f in r.frames() for x in f.column("price").to_pylist()]  # unique floats
        assert 0 < r.accounting.rows_read < 750
        total = total.merge(r.accounting)
    assert len(seen) == len(set(seen)) == 750
    assert total.rows_read == total.rows_accepted == 750 and total.balanced
    assert total.row_groups == len(window.row_groups)


def test_shuffle_is_a_seeded_permutation(clean_logs, spec):
    window = open_window(clean_logs, spec)
    feat = featurizer_for(spec, window)

    def groups(shuffle, seed=0, epoch=0):
        r = ImpressionReader(window, spec, feat, batch_size=100, shuffle=shuffle, shuffle_buffer=400,
                             seed=seed, with_eval=True, progress=False)
        return np.concatenate([b.group.numpy() for b in r.batches(epoch)])

    plain, a, b, c = groups(False), groups(True), groups(True), groups(True, epoch=1)
    assert np.array_equal(a, b) and not np.array_equal(a, plain) and not np.array_equal(a, c)
    assert np.array_equal(np.sort(a), np.sort(plain))
    # a shuffled batch is still internally consistent: dense rows move with their ids
    r = ImpressionReader(window, spec, feat, batch_size=750, shuffle=True, with_eval=True, progress=False)
    (batch,) = list(r.batches())
    ref = feat.transform(pl.concat([pl.read_parquet(f) for f in window.files], how="vertical_relaxed"),
                         with_eval=True)
    order = {float(v): i for i, v in enumerate(ref.dense[:, 0])}
    perm = np.array([order[float(v)] for v in batch.dense[:, 0]])
    assert np.array_equal(batch.ids.numpy(), ref.ids[perm])
    cat = batch.bags["category"]
    ends = np.append(cat.offsets.numpy()[1:], cat.values.numel())
    bags = [cat.values.numpy()[s:e].tolist() for s, e in zip(cat.offsets.numpy(), ends)]
    rc = ref.bags["category"]
    ref_ends = np.append(rc.offsets[1:], rc.values.size)
    ref_bags = [rc.values[s:e].tolist() for s, e in zip(rc.offsets, ref_ends)]
    assert bags == [ref_bags[p] for p in perm]


def test_schema_problems_name_file_and_column(tmp_path, spec):
    root = tmp_path / "s"
    write_day(root, D1, [make_frame(spec, 20).drop("city")])
    with pytest.raises(BadInputError, match="column 'city': rule missing_column") as e:
        open_window(root, spec)
    assert "part-00000.parquet" in e.value.file
    root2 = tmp_path / "t"
    write_day(root2, D1, [make_frame(spec, 20).with_columns(pl.col("price").cast(pl.String))])
    with pytest.raises(BadInputError, match="column 'price': rule wrong_type"):
        open_window(root2, spec)


def test_unreadable_empty_and_missing_partitions(tmp_path, spec):
    root = tmp_path / "u"
    write_day(root, D1, [make_frame(spec, 20)])
    (root / f"dt={D2}").mkdir()
    (root / f"dt={D2}" / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(BadInputError, match="rule unreadable_file"):
        open_window(root, spec)
    os.remove(root / f"dt={D2}" / "part-00000.parquet")
    with pytest.raises(BadInputError, match="rule empty_partition"):
        open_window(root, spec)
    with pytest.raises(BadInputError, match="rule missing_partition"):
        open_window(root, spec, D1, dt.date(2026, 11, 3))
    lax = spec.model_copy(update={"allow_empty_partitions": True})
    w = open_window(root, lax, D1, dt.date(2026, 11, 3))
    assert w.rows == 20 and w.empty_partitions == ["dt=2026-11-02", "dt=2026-11-03"]


def test_truncated_file_is_a_clear_error(tmp_path, spec):
    root = tmp_path / "tr"
    write_day(root, D1, [make_frame(spec, 500)], row_group_size=100)
    f = root / f"dt={D1}" / "part-00000.parquet"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="unreadable_file"):
        open_window(root, spec)


def test_partition_symlink_outside_root_is_refused(tmp_path, spec):
    outside = tmp_path / "elsewhere"
    write_day(outside, D1, [make_frame(spec, 10)])
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / f"dt={D1}", root / f"dt={D1}")
    with pytest.raises(BadInputError, match="outside the data root"):
        open_window(root, spec)


def test_int_and_string_id_files_read_together(tmp_path, spec):
    root = tmp_path / "mixed"
    a = unique_rows(spec, 100, 1, "a")
    b = unique_rows(spec, 100, 2, "b").with_columns(pl.col("user_id").cast(pl.String))
    write_day(root, D1, [a, b])
    window = open_window(root, spec)
    feat = featurizer_for(spec, window)
    r = ImpressionReader(window, spec, feat, batch_size=1000, progress=False)
    (batch,) = list(r.batches())
    ref = feat.transform(pl.concat([a, b.with_columns(pl.col("user_id").cast(pl.Int64))])).ids
    assert np.array_equal(batch.ids.numpy(), ref)
