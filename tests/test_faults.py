"""Faults survived, for real: a tracking server (a real `mlflow server` on 127.0.0.1) that is down at
the start or killed in the middle of a run; corrupt and truncated Parquet in the training window; a full
disk (RLIMIT_FSIZE, so writes fail with EFBIG as on a full quota) and an unwritable output folder for
`mtrank score` and `mtrank evaluate`."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from tests.conftest import MTRANK, generate_demo_logs, mtrank_in_process, small_spec, write_job
from tests.mlflow_server import MlflowServer as Server

pytestmark = pytest.mark.slow   # end to end

NAME = "faults"
TINY = {"experts": 2, "expert_mlp": [16], "tower_mlp": [8]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    generate_demo_logs(base / "logs", days=4, rows=6_000, seed=5, users=1000, items=400)
    small_spec(base / "spec.yaml", max_buckets=512, dim=8)   # a model of a few hundred KB uploads in no time
    return base


def job(base: Path, file: str, **over) -> Path:
    return write_job(base / file, NAME, {"batch_size": 2048, "epochs": 1, "lr": 0.003}, model=TINY,
                     **{"window_days": 1, **over})


def run(*args, preexec_fn=None, code=None, env=None):
    cmd = [sys.executable, "-c", code, *map(str, args)] if code else [*MTRANK, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec_fn,
                          env={**os.environ, **(env or {})}, timeout=300)


def here(*args):
    """Through main() in this process: paths that need no process of their own (no kill, no limit)."""
    return mtrank_in_process(*args)


# ---------------------------------------------------------------------------------------------
# Tracking server down / going away


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port` (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


# The fault hook: runs `mtrank` in-process and SIGKILLs the server's process group at a chosen point
# (deterministic: not a race with a timer): when the model weights start uploading (the run exists,
# its metadata and report are logged, the model is not) or when a model is first downloaded (promotion).
HOOK = """
import os, signal, socket, sys, time
import mlflow.store.artifact.http_artifact_repo as h

def kill():
    try:
        os.killpg(int(os.environ["FAULT_SERVER_PGID"]), signal.SIGKILL)
    except ProcessLookupError:  # parallel downloads: another thread was first
        pass
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", int(os.environ["FAULT_SERVER_PORT"])), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            return

if os.environ["FAULT_KILL_AT"] == "upload_weights":
    upload = h.HttpArtifactRepository.log_artifact
    def log_artifact(self, local_file, artifact_path=None):
        if str(local_file).endswith("weights.pt"):
            print("FAULT: killing the tracking server during the weights upload", file=sys.stderr)
            kill()
        return upload(self, local_file, artifact_path)
    h.HttpArtifactRepository.log_artifact = log_artifact
else:
    download = h.HttpArtifactRepository._download_file
    def _download_file(self, remote_file_path, local_path):
        print("FAULT: killing the tracking server during a model download", file=sys.stderr)
        kill()
        return download(self, remote_file_path, local_path)
    h.HttpArtifactRepository._download_file = _download_file

from mtrank.jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def daily_killing_server(server: Server, config: Path, date: str, at: str):
    r = run("daily", "--config", config, "--date", date, code=HOOK,
            env={"FAULT_SERVER_PGID": str(server.proc.pid), "FAULT_SERVER_PORT": str(server.port),
                 "FAULT_KILL_AT": at})
    server.reap()
    assert "FAULT: killing" in r.stderr, r.stderr[-3000:]
    return r


def versions(server: Server) -> list:
    try:
        return sorted(server.client().search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    except mlflow.exceptions.MlflowException:
        return []


def champion(server: Server):
    try:
        return str(server.client().get_model_version_by_alias(NAME, "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def assert_artifacts(server: Server, version: str, tmp: Path) -> None:
    """Every registered version can be downloaded whole: weights and spec are there."""
    source = server.client().get_model_version_download_uri(NAME, version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=server.url))
    model = local / "artifacts" / "model"
    assert (model / "weights.pt").stat().st_size > 0 and (model / "feature_spec.yaml").exists()


def assert_clear_failure(r, server: Server, run_dir: Path, date: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("mtrank daily: error: tracking server " + server.url), err
    assert "2 attempts failed" in err and "Traceback" not in r.stderr
    assert f"kept in {run_dir}" in err and f"mtrank daily --date {date}" in err and "without retraining" in err
    assert (run_dir / "metrics.json").exists() and (run_dir / "model" / "weights.pt").exists()


def test_tracking_down_at_start_fails_fast_then_a_rerun_logs_without_retraining(base, server, tmp_path):
    cfg = job(base, "http.yaml", tracking_uri=server.url,
              tracking={"retries": 1, "backoff_seconds": 0, "timeout_seconds": 5})
    date, run_dir = "2026-11-02", base / "work" / "runs" / NAME / "2026-11-02"
    assert refuses(server.port)  # nobody listens yet
    r = run("daily", "--config", cfg, "--date", date)
    assert_clear_failure(r, server, run_dir, date)   # bounded by count: "2 attempts failed" (1 + retries 1)
    assert "Training anyway" in r.stderr  # the outcome is made and kept even though the server is down
    weights = (run_dir / "model" / "weights.pt").stat().st_mtime_ns

    server.start()
    assert listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1 only, no IPv6 / wildcard
    r = run("daily", "--config", cfg, "--date", date)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"training outcome found in {run_dir}; logged it without retraining as {NAME} v1" in r.stdout
    assert (run_dir / "model" / "weights.pt").stat().st_mtime_ns == weights  # not retrained
    assert [v.version for v in versions(server)] == ["1"] and champion(server) == "1"
    assert_artifacts(server, "1", tmp_path)


def test_server_killed_mid_run_leaves_nothing_half_registered(base, server, tmp_path):
    cfg = job(base, "http.yaml", tracking_uri=server.url,
              tracking={"retries": 1, "backoff_seconds": 0, "timeout_seconds": 5})
    if server.proc is None:
        server.start()
    if champion(server) is None:  # this test alone: make the champion the next date is gated against
        assert run("daily", "--config", cfg, "--date", "2026-11-02").returncode == 0
    before = [v.version for v in versions(server)]
    champ = champion(server)
    date, run_dir = "2026-11-03", base / "work" / "runs" / NAME / "2026-11-03"

    # 1. the server dies while the model is being logged: the run exists, the model does not
    r = daily_killing_server(server, cfg, date, "upload_weights")
    assert_clear_failure(r, server, run_dir, date)
    assert "while logging the training outcome" in r.stderr
    server.start()
    assert [v.version for v in versions(server)] == before  # no version without its artifacts
    assert champion(server) == champ

    # 2. rerun, and the server dies while promotion downloads the new challenger
    r = daily_killing_server(server, cfg, date, "download")
    assert r.returncode == 2 and "while downloading models:/" in r.stderr, r.stderr[-3000:]
    assert "logged it without retraining" not in r.stdout  # it failed before reporting
    server.start()
    new = [v for v in versions(server) if v.version not in before]
    assert len(new) == 1 and new[0].tags["mtrank.date"] == date  # logged once, from the run directory
    assert_artifacts(server, new[0].version, tmp_path / "new")
    assert champion(server) == champ and "promotion.decision" not in new[0].tags  # undecided, not promoted

    # 3. the server stays up: the rerun reuses that version and decides
    r = run("daily", "--config", cfg, "--date", date)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"reusing {NAME} v{new[0].version}" in r.stdout
    assert len(versions(server)) == len(before) + 1
    decided = server.client().get_model_version(NAME, new[0].version)
    assert decided.tags["promotion.decision"] in ("promoted", "rejected")
    assert champion(server) == (new[0].version if decided.tags["promotion.decision"] == "promoted" else champ)


# ---------------------------------------------------------------------------------------------
# Corrupt / truncated Parquet in the training window


def split_day(src: Path, dst: Path, parts: int = 2) -> list[Path]:
    """Rewrite one day's file as `parts` files (page checksums on, as `mtrank generate` writes)."""
    table = pq.read_table(src)
    dst.mkdir(parents=True, exist_ok=True)
    n = -(-table.num_rows // parts)
    out = []
    for i in range(parts):
        p = dst / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(i * n, n), p, compression="snappy", write_page_checksum=True)
        out.append(p)
    return out


def corrupt_column(path: Path, column: str) -> None:
    """Overwrite bytes in the middle of one column chunk (the footer stays intact)."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    c = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    start = c.dictionary_page_offset or c.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start + c.total_compressed_size // 2)
        f.write(bytes(range(256))[: max(16, min(256, c.total_compressed_size // 4))])


@pytest.fixture(scope="module")
def bad_logs(base, tmp_path_factory):
    """dt=11-01: one intact file + one truncated to half its bytes; dt=11-02: one intact + one with
    corrupt pages (footer intact); dt=11-03: intact (the evaluation day)."""
    root = tmp_path_factory.mktemp("badlogs")
    day = lambda d: next((base / "logs" / f"dt={d}").glob("*.parquet"))  # noqa: E731
    good1, truncated = split_day(day("2026-11-01"), root / "logs" / "dt=2026-11-01")
    os.truncate(truncated, truncated.stat().st_size // 2)
    good2, corrupt = split_day(day("2026-11-02"), root / "logs" / "dt=2026-11-02")
    corrupt_column(corrupt, "click")
    split_day(day("2026-11-03"), root / "logs" / "dt=2026-11-03", parts=1)
    (root / "spec.yaml").write_text((base / "spec.yaml").read_text())
    rows = {"good": pq.read_metadata(good1).num_rows + pq.read_metadata(good2).num_rows}
    return root, corrupt, truncated, rows


def test_truncated_or_corrupt_file_fails_naming_it(bad_logs):
    root, corrupt, truncated, _ = bad_logs
    r = here("validate", "--data", root / "logs", "--no-collisions")
    assert r.returncode == 2 and f"{truncated}: rule unreadable_file: not a readable Parquet file" in r.stderr, r.stderr
    r = here("validate", "--data", root / "logs", "--from", "2026-11-02", "--to", "2026-11-02", "--no-collisions")
    assert r.returncode == 2 and f"{corrupt}: rule unreadable_file: row group 0 cannot be read" in r.stderr, r.stderr
    assert "on_unreadable_file: skip" in r.stderr

    for window, bad in ((2, truncated), (1, corrupt)):  # evaluated on the intact 11-03
        cfg = job(root, "fail.yaml", window_days=window, work_dir="work-fail")
        r = here("train", "--config", cfg, "--date", "2026-11-03", "--no-track")
        assert r.returncode == 2 and f"mtrank train: error: {bad}: rule unreadable_file" in r.stderr, r.stderr[-2000:]
        assert not (root / "work-fail" / "runs" / NAME / "2026-11-03" / "metrics.json").exists()  # no outcome


def test_unreadable_files_skipped_when_configured_counted_and_reported(bad_logs):
    root, corrupt, truncated, rows = bad_logs
    r = here("validate", "--data", root / "logs", "--on-unreadable-file", "skip", "--json", root / "v.json")
    assert r.returncode == 0, r.stderr
    assert f"SKIPPED unreadable file {truncated}" in r.stdout and f"SKIPPED unreadable file {corrupt} row group 0" in r.stdout
    rep = json.loads((root / "v.json").read_text())
    assert {u["file"] for u in rep["skipped_files"]} == {str(corrupt), str(truncated)}
    assert rep["accounting"]["balanced"] and rep["accounting"]["unreadable_skipped"] == 1

    cfg = job(root, "skip.yaml", window_days=2, on_unreadable_file="skip")
    r = here("train", "--config", cfg, "--date", "2026-11-03", "--no-track")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("skipping") >= 2 and f"SKIPPED unreadable file {truncated}" in r.stdout
    out = json.loads((root / "work" / "runs" / NAME / "2026-11-03" / "metrics.json").read_text())
    acc = out["rows"]
    assert acc["files_skipped"] == 2 and {u["file"] for u in acc["unreadable"]} == {str(corrupt), str(truncated)}
    assert acc["read"] == rows["good"] == acc["trained"] + acc["rejected"]  # only the intact files, all of them
    assert out["train_window"]["unreadable_files"][0]["file"] == str(truncated)


# ---------------------------------------------------------------------------------------------
# Full disk / unwritable output


def fsize_limit(nbytes: int):
    """In the child: files may not grow past `nbytes` (EFBIG, as on a full disk or quota)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


@pytest.fixture(scope="module")
def scored(base):
    """A saved model (no tracking) and a candidate day for it."""
    cfg = job(base, "local.yaml", work_dir="work-local")
    r = here("train", "--config", cfg, "--date", "2026-11-04", "--no-track")
    assert r.returncode == 0, r.stderr[-3000:]
    r = here("generate", "--candidates", "--out", base / "cand", "--date", "2026-11-04", "--requests", 150,
            "--per-request", 30, "--seed", 5, "--users", 1000, "--items", 400)
    assert r.returncode == 0, r.stderr
    return base / "work-local" / "runs" / NAME / "2026-11-04" / "model", base / "cand"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_score_on_a_full_disk_fails_clearly_and_keeps_the_old_output(scored, base, tmp_path):
    model, cand = scored
    out = tmp_path / "ranked.parquet"
    out.write_bytes(b"previous output")
    args = ("score", "--model", model, "--candidates", cand, "--date", "2026-11-04", "--out", out, "--no-track",
            "--config", base / "local.yaml")
    r = run(*args, preexec_fn=fsize_limit(16 * 1024))
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"mtrank score: error: cannot write {out}: ") and "File too large" in err, err
    assert out.read_bytes() == b"previous output" and leftovers(tmp_path) == ["ranked.parquet"]  # no temp left

    r = run(*args)  # the same job with room to write
    assert r.returncode == 0 and pq.read_metadata(out).num_rows > 0, r.stderr[-2000:]


def test_score_into_an_unwritable_folder_fails_before_any_work(scored, base, tmp_path):
    model, cand = scored
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "ranked.parquet"  # its parent is a regular file
    r = here("score", "--model", model, "--candidates", cand, "--date", "2026-11-04", "--out", out, "--no-track",
            "--config", base / "local.yaml")
    assert r.returncode == 2 and f"cannot write {out.parent}: " in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "scored" not in r.stdout


def test_evaluate_report_on_a_full_disk_or_unwritable_folder(scored, base, tmp_path):
    model, _ = scored
    rep = tmp_path / "report"
    rep.mkdir()
    (rep / "report.html").write_text("old report")
    (rep / "metrics.json").write_text("{}")
    args = ("evaluate", "--model", model, "--data", base / "logs", "--date", "2026-11-04")
    r = run(*args, "--out", rep, preexec_fn=fsize_limit(32 * 1024))  # the HTML with its plots is larger
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"mtrank evaluate: error: cannot write {rep / 'report.html'}: File too large" in r.stderr, r.stderr[-2000:]
    assert (rep / "report.html").read_text() == "old report" and (rep / "metrics.json").read_text() == "{}"
    assert leftovers(rep) == ["metrics.json", "report.html"]  # the pair untouched, no temporary files

    (tmp_path / "file").write_text("x")
    r = run(*args, "--out", tmp_path / "file" / "report")
    assert r.returncode == 2 and f"cannot write {tmp_path / 'file' / 'report'}: Not a directory" in r.stderr, r.stderr
