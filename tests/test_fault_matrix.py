"""kill -9 at each stage of a daily job, then the rerun a scheduler would make.

Every stage leaves the registry and the files in a state the rerun completes: exactly one version
for the date, a champion that is unchanged or moved by a recorded decision, and no partial output
under a final name. The kill is real (SIGKILL from inside the process at a named failpoint,
`MTRANK_FAILPOINT`, so nothing is cleaned up), against a real sqlite MLflow store.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import MTRANK, mtrank_in_process, sqlite_client, write_job

pytestmark = pytest.mark.slow   # end to end
NAME, D1, D2 = "ranker", "2026-11-03", "2026-11-04"
TRAIN = {"batch_size": 1024, "epochs": 1, "lr": 0.003, "checkpoint_every": 3}


def run(base: Path, *args, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """With a failpoint: a process of its own that kills itself there. Without: the rerun, through
    main() in this process (no MTRANK_FAILPOINT here)."""
    if not failpoint:
        assert "MTRANK_FAILPOINT" not in os.environ
        return mtrank_in_process(*args, cwd=base)
    env = {**os.environ, "MTRANK_FAILPOINT": failpoint}
    return subprocess.run([*MTRANK, *map(str, args)], capture_output=True, text=True, cwd=base, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, ranker):
    """The shared ranker (logs, spec, a registry whose champion v1 was trained for D1) and candidates
    for D2; every test works on its own copy."""
    base = tmp_path_factory.mktemp("matrix") / "b"
    shutil.copytree(ranker, base, ignore=shutil.ignore_patterns("*.init.lock"))
    r = run(base, "generate", "--candidates", "--out", base / "cand", "--date", D2, "--requests", 30,
            "--per-request", 20, "--seed", 6, "--users", 2000, "--items", 800)
    assert r.returncode == 0, r.stderr
    write_job(base / "job.yaml", NAME, TRAIN, score={"list_size": 10})
    return base


def copy(pristine: Path, dst: Path) -> Path:
    """The pristine state in a folder of its own (the sqlite store's artifacts stay where they were
    logged; new runs write theirs there too, under their own run ids)."""
    shutil.copytree(pristine, dst, ignore=shutil.ignore_patterns("*.init.lock"))
    return dst


def date_versions(base: Path, date: str) -> list:
    return sqlite_client(base).search_model_versions(f"name='{NAME}' and tag.`mtrank.date`='{date}'")


def champion(base: Path) -> str:
    return str(sqlite_client(base).get_model_version_by_alias(NAME, "champion").version)


def assert_complete(run_dir: Path) -> None:
    """Every file under its final name is whole: JSON parses, the report ends, weights exist."""
    json.loads((run_dir / "metrics.json").read_text())
    json.loads((run_dir / "report" / "metrics.json").read_text())
    assert (run_dir / "report" / "report.html").read_text().rstrip().endswith("</html>")
    assert (run_dir / "model" / "weights.pt").stat().st_size > 0


@pytest.mark.parametrize("stage", ["training", "after_training", "registration", "promotion"])
def test_kill_9_in_a_daily_then_rerun(pristine, tmp_path, stage):
    base = copy(pristine, tmp_path / "b")
    assert champion(base) == "1"
    r = run(base, "daily", "--config", "job.yaml", "--date", D2, failpoint=stage)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert len(date_versions(base, D2)) == (1 if stage in ("registration", "promotion") else 0)
    assert champion(base) in ("1", "2")                   # never a half-moved alias
    run_dir = base / "work" / "runs" / NAME / D2
    if stage == "training":
        assert not (run_dir / "metrics.json").exists()   # killed mid-training: no outcome yet
        # the job edited before the rerun: the daily's own resume is refused, naming the change and
        # the daily's remedy (--force), not `mtrank train`'s ("start without --resume")
        job = base / "job.yaml"
        kept = job.read_text()
        job.write_text(kept.replace("lr: 0.003", "lr: 0.004"))
        r = run(base, "daily", "--config", "job.yaml", "--date", D2)
        assert r.returncode == 2 and "train.lr: 0.003 -> 0.004" in r.stderr and "--force" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "without --resume" not in r.stderr
        assert len(date_versions(base, D2)) == 0
        job.write_text(kept)

    r = run(base, "daily", "--config", "job.yaml", "--date", D2)
    assert r.returncode == 0, r.stderr[-3000:]
    if stage == "training":
        assert json.loads((run_dir / "metrics.json").read_text())["resumed_from_step"] is not None
    versions = date_versions(base, D2)
    assert len(versions) == 1, [v.version for v in versions]
    v = sqlite_client(base).get_model_version(NAME, versions[0].version)
    assert v.tags["promotion.decision"] in ("promoted", "rejected")
    assert champion(base) == (str(v.version) if v.tags["promotion.decision"] == "promoted" else "1")
    assert_complete(run_dir)
    if stage == "promotion":   # and once more: nothing changes (the other stages end in the same state)
        r = run(base, "daily", "--config", "job.yaml", "--date", D2)
        assert r.returncode == 0 and f"reusing {NAME} v{v.version}" in r.stdout
        assert len(date_versions(base, D2)) == 1


def test_kill_9_while_scoring_writes_leaves_no_partial_list(pristine, tmp_path):
    base = copy(pristine, tmp_path / "b")
    out = base / "scores" / "ranked.parquet"
    args = ("score", "--config", "job.yaml", "--model", f"models:/{NAME}@champion", "--candidates", "cand",
            "--date", D2, "--out", out, "--no-track")
    r = run(base, *args, failpoint="score_write")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert not out.exists() and not out.with_name(out.name + ".summary.json").exists()
    r = run(base, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert pq.read_table(out).num_rows == 30 * 20
    assert not out.with_name(f".{out.name}.tmp").exists()
    assert json.loads(out.with_name(out.name + ".summary.json").read_text())["rows_out"] == 30 * 20
