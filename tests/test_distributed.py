"""Data-parallel training under real torchrun processes (gloo on CPU).

What is checked: ranks with uneven shards stay in lockstep and end with identical weights; table
gradients stay sparse across ranks; rows are neither read twice nor skipped (accounting summed over
ranks, quarantine included); only rank 0 writes and talks to MLflow; a 2-rank job reaches the
1-rank job's AUCs; a failing rank makes the job fail with its error; a 2-rank job exits 0 every
time, and a resumed 2-rank job ends where an uninterrupted one does.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import polars as pl
import pytest
import torch

from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions
from tests.conftest import MTRANK, small_spec, write_job

pytestmark = pytest.mark.slow   # end-to-end: trains models, starts servers or ranks

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
EVAL_DATE = "2026-11-03"


def auc_se(auc: float, pos: int, neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC with `pos` positives and `neg` negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return ((auc * (1 - auc) + (pos - 1) * (q1 - auc * auc) + (neg - 1) * (q2 - auc * auc)) / (pos * neg)) ** 0.5


# 1 rank vs 2 ranks on the same data: the same rows in other batches. Tolerance: each task's AUC
# within two standard errors of the 1-rank AUC on that population (ctr: ~0.02; ctcvr, with ~70
# positives in the evaluation day, ~0.06). bench/ddp_bench.py measures it on 1M rows.
SE_TOL = 2.0


def _logs(out: Path, days: int, rows: int, rg: int, seed: int = 5) -> Path:
    generate_impressions(out, ImpressionConfig(seed=seed, start="2026-11-01", days=days, rows_per_day=rows,
                                               n_users=3000, n_items=1000, row_group_size=rg), progress=False)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Three days (two to train on, one to evaluate) in row groups of 2048 rows, and a copy whose
    training day holds bad rows in a row group that lands on rank 1, with a quarantine spec."""
    base = tmp_path_factory.mktemp("dist")
    logs = _logs(base / "logs", days=3, rows=16_000, rg=2048)
    bad = base / "bad"
    shutil.copytree(logs, bad)
    f = bad / "dt=2026-11-02" / "part-00000.parquet"
    df = pl.read_parquet(f)
    nan_rows = (pl.int_range(df.height) >= 2048) & (pl.int_range(df.height) < 2053)   # row group 1
    df.with_columns(pl.when(nan_rows).then(float("nan")).otherwise(pl.col("price")).alias("price")) \
      .write_parquet(f, row_group_size=2048)
    small_spec(base / "quarantine_spec.yaml", on_bad_row="quarantine")
    small_spec(base / "fail_spec.yaml")
    return base


@pytest.fixture(scope="module")
def small(base):
    """Three small days (1024-row groups) for the jobs that run several times."""
    return _logs(base / "small", days=3, rows=6000, rg=1024, seed=9)


def _job(base: Path, name: str, data: str = "bad", job: dict | None = None, **train) -> Path:
    """A job named `name` over `data`; `job` overrides top-level keys, `train` the train section."""
    top = {"spec": "quarantine_spec.yaml", "work_dir": f"work-{name}", "quarantine_dir": f"quarantine-{name}",
           "model": {"experts": 3, "expert_mlp": [64, 32], "tower_mlp": [16]}, **(job or {})}
    return write_job(base / f"{name}.yaml", name, {"batch_size": 512, "checkpoint_every": 10, "epochs": 1, **train},
                     data=data, **top)


def _train(cmd: list, job: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, "--config", job, "--date", EVAL_DATE, *extra], capture_output=True, text=True,
                          cwd=job.parent, timeout=600)


def _outcome(base: Path, name: str) -> dict:
    return json.loads((base / f"work-{name}" / "runs" / name / EVAL_DATE / "metrics.json").read_text())


def test_ranks_with_uneven_shards_stay_identical_and_table_gradients_stay_sparse(tmp_path):
    logs = _logs(tmp_path / "logs", days=1, rows=9000, rg=2048)   # 5 row groups: 3 for rank 0, 2 for rank 1
    r = subprocess.run([*TORCHRUN, "tests/dist_worker.py", str(logs), str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert info[0]["own_batches"] > info[1]["own_batches"]            # uneven: rank 1 idles at the end
    assert info[0]["steps"] == info[1]["steps"] == info[0]["own_batches"]
    assert info[0]["own_rows"] + info[1]["own_rows"] == 9000
    assert info[0]["rows_trained"] == info[1]["rows_trained"] == info[0]["rows_read"] == 9000
    assert all(info[0]["table_grads_sparse"]) and all(info[1]["table_grads_sparse"])
    assert info[0]["rows_per_step"] > 0
    # the nccl path (all_gather of row/gradient pairs) sums exactly as gloo's sparse all_reduce
    assert info[0]["sparse_sync_modes_agree"] and info[1]["sparse_sync_modes_agree"]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    for part in ("model", "loss"):   # loss: the uncertainty weights are averaged too
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs between ranks"
    assert a["model"]["id_biases.weights.0"].any()   # the children's per-id biases trained (from zero), in sync


def test_two_ranks_match_one_rank_and_account_for_every_row(base):
    one = _train(MTRANK + ["train"], _job(base, "one"), "--no-track")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(MTRANK + ["train"], _job(base, "two"), "--no-track", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    o1, o2 = _outcome(base, "one"), _outcome(base, "two")
    assert o2["ranks"] == 2 and o1["ranks"] == 1
    # every row read once: the same totals, and read = trained + rejected (bad rows sat on rank 1)
    for o in (o1, o2):
        rows = o["rows"]
        assert rows["read"] == 32_000 == rows["trained"] + rows["rejected"]
        assert rows["rejected_by_reason"] == {"price:non_finite": 5}
    assert o1["eval_rows"] == o2["eval_rows"] == 16_000
    assert len(list((base / "quarantine-two").rglob("*.parquet"))) == 1
    for task, m in o1["tasks"].items():
        if "auc" in m:
            tol = SE_TOL * auc_se(m["auc"], m["positives"], m["rows"] - m["positives"])
            assert abs(m["auc"] - o2["tasks"][task]["auc"]) <= tol, (task, m["auc"], o2["tasks"][task]["auc"])
            assert m["rows"] == o2["tasks"][task]["rows"]
    assert o2["tasks"]["ctr"]["auc"] > 0.58
    assert "[rank 1/2]" not in two.stdout and two.stdout.count("trained 31,995 rows (read 32,000, rejected 5)") == 1   # rank 0 reports


def test_failing_rank_fails_the_job_with_its_error(base):
    job = _job(base, "fails", job={"spec": "fail_spec.yaml"})   # on_bad_row fail; the bad rows are on rank 1's shard
    r = _train(MTRANK + ["train"], job, "--no-track", "--nproc", "2")
    assert r.returncode != 0
    assert "[rank 1/2]: error:" in r.stderr and "column 'price': rule non_finite" in r.stderr
    assert not (base / "work-fails" / "runs" / "fails" / EVAL_DATE / "metrics.json").exists()


def test_repeated_two_rank_jobs_exit_cleanly_register_once_and_resume_exactly(base, small):
    """Three 2-rank jobs, each must exit 0: torchrun -m mtrank.jobs.cli train (tracked: one MLflow run, one
    version), then the same job for one epoch and its --resume to two epochs, which must end with the
    weights of the uninterrupted two-epoch job."""
    full = _job(base, "full", data="small", epochs=2)
    r = _train(TORCHRUN + ["-m", "mtrank.jobs.cli", "train"], full)   # tracked: the default sqlite store under work_dir
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{(base / 'work-full' / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(uri, uri)
    assert len(client.search_model_versions("name='full'")) == 1
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
    part = _job(base, "part", data="small", epochs=1)
    r = _train(MTRANK + ["train"], part, "--no-track", "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    part.write_text(part.read_text().replace("epochs: 1", "epochs: 2"))
    r = _train(MTRANK + ["train"], part, "--no-track", "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stdout
    w = {n: torch.load(base / f"work-{n}" / "runs" / n / EVAL_DATE / "model" / "weights.pt", weights_only=True)
         for n in ("full", "part")}
    for k, v in w["full"].items():
        torch.testing.assert_close(w["part"][k], v, rtol=0, atol=1e-6, msg=f"{k} after resume")


def test_daily_trains_on_ranks_and_warm_starts_them_from_the_champion(base, small):
    """`mtrank daily --nproc 2` twice: a full retrain, then a warm start from v1 whose weights and
    optimizer state reach both ranks; tracking and promotion stay in the daily process."""
    job = _job(base, "daily", data="small", job={"window_days": 1, "warm_start": {"from": "champion"}})
    for date in ("2026-11-02", "2026-11-03"):
        r = subprocess.run([*MTRANK, "daily", "--config", job, "--date", date, "--nproc", "2"], capture_output=True,
                           text=True, cwd=base, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("population") == 1, r.stdout   # one metrics table: daily's, not rank 0's too
    uri = f"sqlite:///{(base / 'work-daily' / 'mlflow.db').resolve()}"
    versions = {v.version: v for v in mlflow.MlflowClient(uri, uri).search_model_versions("name='daily'")}
    assert sorted(int(v) for v in versions) == [1, 2]
    v2 = versions[max(versions, key=int)].tags
    assert v2["mtrank.train_mode"] == "warm" and v2["mtrank.parent_version"] == "1"
    outcome = json.loads((base / "work-daily" / "runs" / "daily" / "2026-11-03" / "metrics.json").read_text())
    assert outcome["ranks"] == 2 and outcome["lineage"]["optimizer_state"] is True
    assert outcome["rows"]["trained"] == 6000


def test_device_choice_is_explicit_about_a_missing_gpu():
    from mtrank.pipeline.distributed import Dist, resolve_device
    from mtrank.pipeline.trainer import TrainConfig

    if torch.cuda.is_available():
        pytest.skip("this check is about a machine without CUDA")
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu", Dist(1, 2, 1))
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError):
        TrainConfig(device="tpu")
    # where the model trains is not part of what a resume must match
    assert TrainConfig(device="cpu").fingerprint_fields() == TrainConfig(device="auto").fingerprint_fields()
