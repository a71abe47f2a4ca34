"""The fast scoring paths compute what a plain forward computes.

`mtrank score` featurizes chunk k+1 in a background thread while the model runs chunk k
(`predict_frames`), under inference mode and in eval mode. These tests hold it to plain
`model(batch)` calls over the same rows: bit for bit in fp32 over the same chunks. Against one
forward over all rows at once the CPU's GEMM may round a row differently when the batch has another
size (a few rows by 1 ulp, the kernel's choice, not the pipeline's), so there within 1e-6 relative.
"""
from __future__ import annotations

import datetime as dt
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from tests.conftest import small_spec
from mtrank.features.featurize import Featurizer
from mtrank.features.numeric import NumericStats
from mtrank.features.rules import BadInputError
from mtrank.features.spec import load_spec
from mtrank.jobs.config import load_config
from mtrank.jobs.model_io import load_model, save_model
from mtrank.jobs.score import score
from mtrank.models import ModelConfig
from mtrank.pipeline.batch import batch_from_arrays
from mtrank.pipeline.evaluate import overlap_pays, predict_frames, predict_rows
from mtrank.pipeline.scoring import ScoringConfig
from mtrank.pipeline.synthetic import ImpressionConfig, generate_candidates, generate_impressions
from mtrank.pipeline.trainer import build_model

DAY = dt.date(2026, 11, 8)
CFG = ImpressionConfig(seed=5, start=DAY, days=1, rows_per_day=2_000, n_users=5_000, n_items=3_000,
                       n_categories=200, n_brands=1_000, n_shops=1_500)
SMALL = ModelConfig(experts=2, expert_mlp=(32, 16), tower_mlp=(8,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small untrained model of the default spec (tables capped) saved like training saves it,
    and a generated candidate day (3,000 rows)."""
    root = tmp_path_factory.mktemp("speed")
    spec = load_spec(small_spec(root / "spec.yaml", max_buckets=2048))
    generate_impressions(root / "logs", CFG, progress=False)
    logs = pa.concat_tables(pq.read_table(f) for f in sorted((root / "logs" / f"dt={DAY}").glob("*.parquet")))
    import polars as pl

    stats = NumericStats.of_frame(pl.from_arrow(logs), spec)
    save_model(root / "model", build_model(spec, SMALL, 0, stats), spec, stats)
    generate_candidates(root / "cands", CFG, DAY + dt.timedelta(days=1), requests=60, per_request=50, progress=False)
    files = sorted((root / "cands").rglob("*.parquet"))
    assert len(files) == 1
    table = pq.read_table(files[0])
    return root, load_model(root / "model"), table


def plain_forward(model, featurizer, table: pa.Table) -> dict[str, np.ndarray]:
    """One forward over every row at once."""
    with torch.inference_mode():
        out = model(batch_from_arrays(featurizer.transform(table, with_labels=False))).predictions
    return {k: v.numpy() for k, v in out.items()}


def plain_chunks(model, featurizer, frames, chunk_rows: int) -> dict[str, np.ndarray]:
    """The reference: plain forwards, one after another, over each frame's `chunk_rows` slices."""
    return collect((None, plain_forward(model, featurizer, f.slice(s, chunk_rows)))
                   for f in frames for s in range(0, f.num_rows, chunk_rows))


def collect(pairs) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for _, preds in pairs:
        for k, v in preds.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.parametrize("frame_rows, chunk_rows", [(700, 256), (1024, 1024), (5_000, 512)])
def test_overlapped_chunks_equal_one_plain_forward(world, frame_rows, chunk_rows):
    _, saved, table = world
    fz = Featurizer(saved.spec, saved.stats)
    frames = table.to_batches(max_chunksize=frame_rows)
    want = plain_chunks(saved.model, fz, frames, chunk_rows)
    overlapped = collect(predict_frames(saved.model, fz, iter(frames), chunk_rows=chunk_rows, prefetch=1))
    serial = collect((f, predict_rows(saved.model, fz, f, chunk_rows=chunk_rows)) for f in frames)
    once = plain_forward(saved.model, fz, table)
    assert set(overlapped) == set(serial) == set(want) == set(once) and len(want["p_ctr"]) == table.num_rows
    for k in want:
        np.testing.assert_array_equal(overlapped[k], want[k], err_msg=k)   # the thread changes nothing
        np.testing.assert_array_equal(serial[k], want[k], err_msg=k)
        np.testing.assert_allclose(overlapped[k], once[k], rtol=1e-6, atol=0, err_msg=k)


def test_forward_runs_in_inference_and_eval_mode_and_restores_the_mode(world):
    _, saved, table = world
    fz = Featurizer(saved.spec, saved.stats)
    model = build_model(saved.spec, SMALL.model_copy(update={"dropout": 0.5}), 0, saved.stats)
    model.load_state_dict(saved.model.state_dict())
    model.train()
    seen = []
    hook = model.towers.register_forward_hook(lambda m, args, out: seen.append(   # every forward passes the towers
        (torch.is_inference_mode_enabled(), model.training, out.requires_grad)))
    try:
        rows = predict_rows(model, fz, table, chunk_rows=1_000)
        frames = collect(predict_frames(model, fz, table.to_batches(max_chunksize=1_000)))
    finally:
        hook.remove()
    assert len(seen) == 6 and all(inf and not training and not grad for inf, training, grad in seen), seen
    assert model.training                        # the caller's mode is back
    want = plain_chunks(saved.model, fz, table.to_batches(max_chunksize=1_000), 1_000)  # dropout off
    for k in want:
        np.testing.assert_array_equal(rows[k], want[k], err_msg=k)
        np.testing.assert_array_equal(frames[k], want[k], err_msg=k)


def test_a_background_error_is_raised_unchanged_and_the_thread_stops(world):
    _, saved, table = world
    fz = Featurizer(saved.spec, saved.stats)

    def frames():
        yield table.slice(0, 100)
        raise BadInputError("cands.parquet", "user_id", "null", "rows have a null id", count=3)

    got = []
    with pytest.raises(BadInputError, match="null id") as e:
        for item, preds in predict_frames(saved.model, fz, frames()):
            got.append(len(preds["p_ctr"]))
    assert got == [100] and e.value.column == "user_id"
    # a consumer that stops early: the producer stops too (no thread left behind)
    gen = predict_frames(saved.model, fz, iter(table.to_batches(max_chunksize=200)), chunk_rows=50)
    next(gen)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name == "mtrank-featurize"]


def test_score_job_overlap_on_and_off_write_the_same_table(world, tmp_path):
    root, saved, table = world
    job = load_config(None, data=str(root / "logs"), work_dir=str(tmp_path / "work"))
    day = DAY + dt.timedelta(days=1)
    runs = {}
    for overlap, rows in ((True, 300), (False, 300), (True, 16_384), (False, 16_384)):
        sc = job.score.model_copy(update={"inference": job.score.inference.model_copy(
            update={"overlap": overlap, "forward_rows": rows})})
        r = score(job, str(root / "model"), root / "cands", day, tmp_path / f"out-{overlap}-{rows}.parquet",
                  scoring=sc, track=False, progress=False)
        assert r.summary["balanced"] and r.summary["seconds"]["forward_s"] > 0
        runs[overlap, rows] = r.table
    assert runs[True, 300].equals(runs[False, 300]) and runs[True, 16_384].equals(runs[False, 16_384])
    # one file, one reader chunk: with 16,384 rows per forward its model columns are one plain forward
    # over the candidates (matched by request and item)
    keys = [("request_id", "ascending"), ("item_id", "ascending")]
    got = runs[True, 16_384].sort_by(keys)
    want = plain_forward(saved.model, Featurizer(saved.spec, saved.stats), table)
    order = table.select([k for k, _ in keys]).append_column("i", pa.array(np.arange(table.num_rows))) \
        .sort_by(keys)["i"].to_numpy()
    want = {k: v[order] for k, v in want.items()}
    assert got.num_rows == table.num_rows and "p_ctr" in got.column_names
    for k, v in want.items():
        if k in got.column_names:
            np.testing.assert_array_equal(got[k].to_numpy(), v, err_msg=k)


def test_one_intra_op_thread_predicts_the_same(world):
    """The pyfunc runs small requests on one torch thread: the same numbers as with several."""
    _, saved, table = world
    fz = Featurizer(saved.spec, saved.stats)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = predict_rows(saved.model, fz, table.slice(0, 1_000))
        torch.set_num_threads(max(2, before))
        many = predict_rows(saved.model, fz, table.slice(0, 1_000))
    finally:
        torch.set_num_threads(before)
    for k in many:
        np.testing.assert_array_equal(one[k], many[k], err_msg=k)


def test_inference_config_validates():
    sc = ScoringConfig()
    assert (sc.inference.precision, sc.inference.forward_rows, sc.inference.overlap) == ("fp32", 16_384, "auto")
    assert ScoringConfig.model_validate({"inference": {"precision": "bf16", "forward_rows": 4096}}).inference.forward_rows == 4096
    for ok in (True, False, "auto"):
        assert ScoringConfig.model_validate({"inference": {"overlap": ok}}).inference.overlap == ok
    for bad in ({"precision": "fp16"}, {"forward_rows": 0}, {"overlap": "sometimes"}, {"batch": 10}):
        with pytest.raises(ValidationError):
            ScoringConfig.model_validate({"inference": bad})


def test_bf16_is_opt_in_and_close_to_fp32(world):
    _, saved, table = world
    fz = Featurizer(saved.spec, saved.stats)
    fp32 = predict_rows(saved.model, fz, table)
    bf16 = collect(predict_frames(saved.model, fz, iter(table.to_batches(max_chunksize=1_000)), precision="bf16"))
    for k in fp32:
        assert bf16[k].dtype == np.float32 and np.isfinite(bf16[k]).all()
        np.testing.assert_allclose(bf16[k], fp32[k], rtol=0.05, atol=0.01, err_msg=k)


def test_overlapping_small_requests_leave_torch_its_thread_count():
    """Concurrent pyfunc requests: one thread while any small one runs, the original count after the
    last, whatever the interleaving (saving/restoring per request could strand the server at 1)."""
    from mtrank.jobs import pyfunc_model

    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, start = [], threading.Barrier(8)

        def request(i: int) -> None:
            start.wait()
            for k in range(20):
                with pyfunc_model._serial_forward(serial=(i + k) % 3 != 0):
                    if (i + k) % 3 != 0:
                        seen.append(torch.get_num_threads())
                    threading.Event().wait(0.0005 * ((i * 7 + k) % 4))
        threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen and set(seen) == {1}                 # every small request ran on one thread
        assert torch.get_num_threads() == 2 and pyfunc_model._serial_requests == 0
    finally:
        torch.set_num_threads(original)


def test_auto_overlap_only_with_a_core_the_forward_leaves_free(world, tmp_path):
    """`overlap: auto` featurizes in the background only when torch's threads leave a core free;
    the score summary says which path ran, and both paths write the same table."""
    import os

    root, saved, _ = world
    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    job = load_config(None, data=str(root / "logs"), work_dir=str(tmp_path / "work"))
    day = DAY + dt.timedelta(days=1)
    tables = {}
    try:
        for threads in sorted({cores, max(1, cores - 1)}):
            torch.set_num_threads(threads)
            assert overlap_pays(saved.model) == (threads < cores)
            r = score(job, str(root / "model"), root / "cands", day, tmp_path / f"out-{threads}.parquet",
                      track=False, progress=False)
            assert r.summary["background_featurize"] == (threads < cores)
            assert ("input_wait_s" in r.summary["seconds"]) == (threads < cores)
            tables[threads] = r.table
    finally:
        torch.set_num_threads(before)
    assert len({t.num_rows for t in tables.values()}) == 1
    first, *rest = tables.values()
    assert all(t.equals(first) for t in rest)


def test_side_tables_are_checked_before_any_candidate_is_scored(world, tmp_path):
    """A broken caps table fails the job naming that file, even when the candidates would fail too:
    the side tables are read before the forward, not after minutes of it."""
    root, _, table = world
    bad_cands = tmp_path / "cands.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("item_id"), "item_id",
                                    pa.array([None] * table.num_rows, table.schema.field("item_id").type)), bad_cands)
    caps = tmp_path / "caps.parquet"
    pq.write_table(pa.table({"item_id": pa.array([1, 2], pa.int64()), "cap": pa.array([1.5, 2.0])}), caps)
    job = load_config(None, data=str(root / "logs"), work_dir=str(tmp_path / "work"))
    sc = job.score.model_copy(update={"traffic_cap": job.score.traffic_cap.model_copy(
        update={"enabled": True, "caps_file": str(caps)})})
    with pytest.raises(BadInputError) as e:
        score(job, str(root / "model"), bad_cands, DAY + dt.timedelta(days=1), tmp_path / "out.parquet",
              scoring=sc, track=False, progress=False)
    assert str(caps) in str(e.value) and "cap" in str(e.value) and "wrong_type" in str(e.value)
