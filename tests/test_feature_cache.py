"""Featurize once: the epochs after the first reuse the hashed rows (memory or disk), every row once
per epoch, the accounting replayed, a whole small window shuffled across its days."""
import os

import numpy as np
import polars as pl
import pytest

from mtrank.features.featurize import Featurizer
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.feature_cache import FeatureCache
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from tests.test_reader import clean_logs  # noqa: F401  (the fixture)


class CountingFeaturizer(Featurizer):
    """A real featurizer that counts how many chunks it hashed."""

    chunks = 0

    def transform(self, *args, **kw):
        self.chunks += 1
        return super().transform(*args, **kw)


@pytest.fixture
def logs(clean_logs):
    """Two days, three files: 300 + 200 rows, then 250."""
    return clean_logs


def featurizer(spec, window) -> CountingFeaturizer:
    return CountingFeaturizer(spec, fit_numeric_stats(ImpressionReader(window, spec, progress=False)))


def reader(window, spec, feat, cache=None, **kw) -> ImpressionReader:
    kw = {"batch_size": 100, "shuffle": True, "shuffle_buffer": 100, "seed": 3, "progress": False,
          "chunk_rows": 64, **kw}
    return ImpressionReader(window, spec, feat, cache=cache, **kw)


def row_keys(batches) -> list[bytes]:
    """Each row's ids and dense values as one key: the multiset of rows an epoch trained on."""
    keys = []
    for b in batches:
        both = np.concatenate([b.ids.numpy().astype(np.float64), b.dense.numpy().astype(np.float64)], axis=1)
        keys += [r.tobytes() for r in both]
    return keys


def file_of_rows(spec, window, feat) -> dict[float, int]:
    """dense[:, 0] (unique per row in these logs) -> the file the row came from."""
    out = {}
    for i, f in enumerate(window.files):
        arrays = Featurizer(spec, feat.stats).transform(pl.read_parquet(f))
        out |= {float(v): i for v in arrays.dense[:, 0]}
    return out


def test_memory_cache_featurizes_once_and_shuffles_the_whole_window(logs, spec):
    window = open_window(logs, spec)
    feat = featurizer(spec, window)
    truth = sorted(row_keys(reader(window, spec, Featurizer(spec, feat.stats), shuffle=False).batches(0)))
    cache = FeatureCache("memory", 1 << 30)
    r = reader(window, spec, feat, cache)
    epochs = [list(r.batches(e)) for e in range(3)]
    assert cache.kind == "memory" and cache.filled_rows == 750
    chunks_first = feat.chunks
    assert chunks_first >= 3            # every file was hashed in the first pass ...
    for e, batches in enumerate(epochs):  # ... and never again; each epoch is every row exactly once
        assert sorted(row_keys(batches)) == truth, e
        assert r.accounting.rows_read == 750 and r.accounting.balanced
    assert feat.chunks == chunks_first
    orders = [row_keys(b) for b in epochs]
    assert orders[0] != orders[1] != orders[2]          # a new permutation per epoch
    assert row_keys(reader(window, spec, feat, FeatureCache("memory", 1 << 30)).batches(1)) == orders[1]
    # a permutation of the whole window: every batch of 100 mixes all three files (both days)
    where = file_of_rows(spec, window, feat)
    for b in epochs[0][:-1]:
        assert {where[float(v)] for v in b.dense[:, 0].numpy()} == {0, 1, 2}


def test_without_cache_every_epoch_hashes_again(logs, spec):
    window = open_window(logs, spec)
    feat = featurizer(spec, window)
    r = reader(window, spec, feat, FeatureCache("off"))
    for e in range(2):
        list(r.batches(e))
    per_epoch = feat.chunks / 2
    assert per_epoch >= 3 and feat.chunks == 2 * per_epoch
    # "off" is exactly the streamed order (the pre-cache behaviour)
    plain = reader(window, spec, Featurizer(spec, feat.stats))
    assert row_keys(r.batches(1)) == row_keys(plain.batches(1))


def test_disk_cache_when_the_window_does_not_fit(logs, spec, tmp_path):
    window = open_window(logs, spec)
    feat = featurizer(spec, window)
    truth = sorted(row_keys(reader(window, spec, Featurizer(spec, feat.stats), shuffle=False).batches(0)))
    where = tmp_path / "cache"
    cache = FeatureCache("auto", budget_bytes=1, directory=where)   # nothing fits in memory
    r = reader(window, spec, feat, cache)
    first = list(r.batches(0))
    hashed = feat.chunks
    # one chunk went to the memory attempt before it overflowed; the pass after it wrote every chunk
    assert cache.kind == "disk" and len(list(cache.disk.glob("chunk-*.npz"))) == hashed - 1 >= 3
    second = list(r.batches(1))
    assert feat.chunks == hashed                      # epoch 2 read the chunks, hashed nothing
    assert sorted(row_keys(first)) == sorted(row_keys(second)) == truth
    assert row_keys(first) != row_keys(second)
    assert r.accounting.rows_read == 750 and r.accounting.balanced
    # a rerun over the same files reuses the directory from its first epoch on
    again = FeatureCache("auto", budget_bytes=1, directory=where)
    feat2 = featurizer(spec, window)
    before = feat2.chunks
    assert row_keys(reader(window, spec, feat2, again).batches(0)) == row_keys(first)   # the same batches
    assert feat2.chunks == before and again.kind == "disk"
    # and they are the batches of reading the files: the cache never changes training
    assert row_keys(reader(window, spec, Featurizer(spec, feat.stats)).batches(1)) == row_keys(second)
    # a changed file is a new key: the old cache is not used, and is replaced
    f = window.files[0]
    pl.read_parquet(f).head(299).write_parquet(f, row_group_size=64)
    os.utime(f, ns=(1, 1))
    window2 = open_window(logs, spec)
    changed = FeatureCache("auto", budget_bytes=1, directory=where)
    feat3 = featurizer(spec, window2)
    before = feat3.chunks
    assert len(row_keys(reader(window2, spec, feat3, changed).batches(0))) == 749
    assert feat3.chunks > before and changed.disk != cache.disk
    assert [p.name for p in where.iterdir()] == [changed.disk.name]


def test_memory_only_cache_that_overflows_streams_every_epoch(logs, spec):
    window = open_window(logs, spec)
    feat = featurizer(spec, window)
    cache = FeatureCache("memory", budget_bytes=1)
    r = reader(window, spec, feat, cache)
    n0 = len(row_keys(r.batches(0)))
    n1 = len(row_keys(r.batches(1)))
    assert n0 == n1 == 750 and cache.kind == "stream"


@pytest.mark.parametrize("budget", [1 << 30, 1])
def test_a_pass_before_training_fills_the_cache_for_the_first_epoch(logs, spec, budget):
    """`fill` (frequency admission's count) sees every row once; when the window fits, the first
    epoch is the memory cache's, bit for bit, with no second read; when it does not, the epochs
    read as without the pass."""
    window = open_window(logs, spec)
    feat = featurizer(spec, window)
    plain = reader(window, spec, Featurizer(spec, feat.stats), FeatureCache("memory", budget))
    want = [row_keys(plain.batches(e)) for e in range(2)]
    cache = FeatureCache("memory", budget)
    r = reader(window, spec, feat, cache)
    seen = []
    kept = cache.fill(r, lambda part: seen.append(part.rows))
    hashed = feat.chunks
    assert sum(seen) == 750 and kept == (budget > 1)
    got = [row_keys(r.batches(e)) for e in range(2)]
    assert got == want                                    # the same batches as without the pass
    assert r.accounting.rows_read == 750 and r.accounting.balanced
    assert (feat.chunks == hashed) == kept                # kept: nothing hashed again


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="feature cache mode"):
        FeatureCache("ram")
