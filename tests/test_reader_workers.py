"""Reader worker threads: the same chunks, keys, order and accounting as one thread, errors included."""
import numpy as np
import pytest

from mtrank.features.featurize import Featurizer
from mtrank.features.rules import BadInputError
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from tests.test_reader import D1, D2, plant_bad_rows, unique_rows, write_day


@pytest.fixture
def logs(tmp_path, spec):
    root = tmp_path / "logs"
    df, _ = plant_bad_rows(spec)
    write_day(root, D1, [unique_rows(spec, 300, 1, "a"), df])
    write_day(root, D2, [unique_rows(spec, 250, 3, "c")])
    return root


def passes(window, spec, workers, **kw):
    r = ImpressionReader(window, spec, progress=False, chunk_rows=40, workers=workers, **kw)
    frames = [(key, rb.to_pydict()) for key, rb in r.keyed_frames(1)]
    return frames, r.accounting.as_dict()


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_workers_read_what_one_reads(logs, spec, tmp_path, shuffle):
    qspec = spec.model_copy(update={"on_bad_row": "quarantine", "duplicate_rows": "reject"})
    window = open_window(logs, qspec)
    one = passes(window, qspec, 1, shuffle=shuffle, quarantine_dir=tmp_path / "q1", negatives=("click", 0.5))
    two = passes(window, qspec, 2, shuffle=shuffle, quarantine_dir=tmp_path / "q2", negatives=("click", 0.5))
    assert one[0] == two[0]                       # same chunks, keys and order
    acc1, acc2 = one[1], two[1]
    assert acc1["rows_rejected"] > 0 and acc1["sampled_out"] > 0 and acc1["balanced"]
    assert {k: v for k, v in acc1.items()} == {k: v for k, v in acc2.items()}
    q1 = sorted(p.name for p in (tmp_path / "q1").rglob("*.parquet"))
    assert q1 and q1 == sorted(p.name for p in (tmp_path / "q2").rglob("*.parquet"))


def test_featurized_batches_are_identical_with_workers(logs, spec, tmp_path):
    qspec = spec.model_copy(update={"on_bad_row": "quarantine"})
    window = open_window(logs, qspec)
    feat = Featurizer(qspec, fit_numeric_stats(ImpressionReader(window, qspec, progress=False,
                                                                quarantine_dir=tmp_path / "q")))
    got = []
    for workers in (1, 2):
        r = ImpressionReader(window, qspec, feat, batch_size=64, shuffle=True, shuffle_buffer=128, seed=4,
                             chunk_rows=50, progress=False, quarantine_dir=tmp_path / "q", workers=workers)
        got.append([(b.ids.numpy().copy(), b.dense.numpy().copy()) for b in r.batches(2)])
    assert len(got[0]) == len(got[1]) > 5
    for (i1, d1), (i2, d2) in zip(*got):
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_a_bad_file_fails_the_same_way_with_workers(logs, spec):
    window = open_window(logs, spec)          # on_bad_row: fail
    errors = []
    for workers in (1, 2):
        with pytest.raises(BadInputError) as e:
            for _ in ImpressionReader(window, spec, progress=False, workers=workers).frames():
                pass
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "part-00001.parquet" in errors[0]


def test_workers_must_be_positive(logs, spec):
    with pytest.raises(ValueError, match="workers"):
        ImpressionReader(open_window(logs, spec), spec, workers=0)
