"""REST latency of the registered model: `mlflow models serve` vs the in-process pyfunc, 1 / 100 / 1,000 rows.

The model is the scoring bench's (the demo job's architecture, statistics of the standard workload's
training day), saved with its input schema and input example as `mtrank train` saves it, logged the
way a training run logs it (`jobs.tracking._log_model`: pyfunc from code, bundled `mtrank` code,
pinned requirements, signature) into a SQLite store under the bench cache and registered. The
server is `mlflow models serve -m models:/NAME/N --env-manager local` in this venv; the client is
sequential (one request in flight), sends `dataframe_split` JSON of candidate rows (the bench's
generated candidate day, feature columns of the signature), warms up first, then interleaves the
sizes. The same rows go through `mlflow.pyfunc.load_model(uri).predict` in this process (MLflow's
schema enforcement included), so server + HTTP + JSON overhead = REST − in-process.

    .venv/bin/python -m bench.serving_bench [--quick] [--requests N] [--reps N] [--sizes 1,100,1000]

Results: bench/results/serving.{json,md} (serving-quick with --quick). Latencies are wall-clock
round trips on this machine; the load average is recorded with every repetition.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import CACHE, machine, write_results
from bench.mtrank_run import EVAL_DAY, ROOT, TRAIN_DAY, ensure_data
from bench.scoring_bench import ensure_candidates, ensure_model

NAME = "serving-bench"
WORK = CACHE / "serving-work"


def code_fingerprint() -> str:
    """The sources a registered version bundles (its pyfunc entry and the `mtrank` packages): a new
    version is logged whenever they change, so the server always runs the code of this checkout."""
    import hashlib
    import importlib

    from mtrank.jobs.packaging import ROOMS

    h = hashlib.sha256()
    for room in ROOMS:
        src = Path(importlib.import_module(f"mtrank.{room}").__file__).parent
        for f in sorted(src.rglob("*.py")):
            h.update(str(f.relative_to(src)).encode() + f.read_bytes())
    return h.hexdigest()


def ensure_registered(job) -> tuple[str, str]:
    """(models:/ URI, tracking URI) of the registered bench model; logged and registered again only
    when the bundled code changed."""
    import mlflow

    from mtrank.features.spec import load_spec
    from mtrank.jobs.model_io import load_model, save_model
    from mtrank.jobs.tracking import _log_model
    from mtrank.jobs.train import input_example
    from mtrank.pipeline.dataset import open_window

    WORK.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(WORK / 'mlflow.db').resolve()}"
    marker = WORK / "registered.json"
    code = code_fingerprint()
    if marker.exists() and json.loads(marker.read_text()).get("code") == code:
        return json.loads(marker.read_text())["model_uri"], uri
    model_dir = WORK / "model"
    if not (model_dir / "input_example.parquet").exists():
        saved = load_model(ensure_model(job))
        window = open_window(ROOT, load_spec(None), TRAIN_DAY, TRAIN_DAY)
        save_model(model_dir, saved.model, saved.spec, saved.stats, input_schema=window.schema,
                   input_example=input_example(window, saved.spec))
    saved = load_model(model_dir)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(NAME) is None:   # artifacts beside the store, never in the working dir
        mlflow.create_experiment(NAME, artifact_location=(WORK / "mlartifacts").resolve().as_uri())
    mlflow.set_experiment(NAME)
    with mlflow.start_run(run_name="serving-bench"):
        info = _log_model(mlflow, model_dir, saved.spec)
    version = mlflow.register_model(info.model_uri, NAME)
    model_uri = f"models:/{NAME}/{version.version}"
    marker.write_text(json.dumps({"model_uri": model_uri, "code": code}))
    return model_uri, uri


def request_frames(sizes: list[int], variants: int):
    """{size: [DataFrame, ...]}: `variants` different slices of the candidate day per size, with the
    signature's feature columns, as a client would send them."""
    from mtrank.features.inputs import conform, serving_schema
    from mtrank.features.spec import load_spec
    from mtrank.jobs.model_io import read_input_schema
    from mtrank.jobs.packaging import example_frame

    spec = load_spec(None)
    schema = serving_schema(spec, read_input_schema(WORK / "model"))
    table = pq.read_table(ensure_candidates(1_000) / f"dt={EVAL_DAY}", columns=schema.names)
    table = conform(table, schema)
    out = {}
    for n in sizes:
        starts = np.linspace(0, table.num_rows - n, variants).astype(int)
        out[n] = [example_frame(table.slice(int(s), n)) for s in starts]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def start_server(model_uri: str, tracking: str, log_path: Path, wait_s: float) -> tuple[subprocess.Popen, int]:
    """`mlflow models serve` from this venv in its own process group; returns once /ping answers."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(log_path, "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + log_path.read_text()[-3000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                stop_server(proc)
                raise RuntimeError(f"server did not answer /ping in {wait_s:.0f} s: " + log_path.read_text()[-3000:])
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group (uvicorn workers included), then kill it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def measure(call, frames: dict[int, list], requests: int, warmup: int) -> dict[int, list[float]]:
    """Seconds per call, sizes interleaved (1, 100, 1000, 1, 100, ...), after `warmup` rounds."""
    sizes = list(frames)
    for i in range(warmup):
        for n in sizes:
            call(n, frames[n][i % len(frames[n])])
    got: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(requests):
        for n in sizes:
            f = frames[n][i % len(frames[n])]
            t0 = time.perf_counter()
            call(n, f)
            got[n].append(time.perf_counter() - t0)
    return got


def summarise(seconds: list[float], rows: int) -> dict:
    ms = np.asarray(seconds) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "rows_per_s": rows / (p50 / 1e3), "n": len(seconds)}


def _cell(values: list[float], fmt: str = "{:,.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="30 requests per size, 3 repetitions")
    ap.add_argument("--requests", type=int, default=None, help="timed requests per size and repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="1,100,1000")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--wait-s", type=float, default=600, help="bound on the server's start")
    a = ap.parse_args()
    requests = a.requests or (30 if a.quick else 200)
    sizes = [int(s) for s in a.sizes.split(",")]
    ensure_data()
    from mtrank.jobs.config import load_config

    job = load_config(None, data=str(ROOT), work_dir=str(WORK / "job"))
    model_uri, tracking = ensure_registered(job)
    frames = request_frames(sizes, variants=8)
    bodies = {n: [json.dumps({"dataframe_split": json.loads(f.to_json(orient="split", index=False))}).encode()
                  for f in fs] for n, fs in frames.items()}

    import mlflow

    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    t0 = time.perf_counter()
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    load_s = time.perf_counter() - t0

    entry = pyfunc.unwrap_python_model()   # the RankerPyfunc: serial_rows as loaded, or 0 (torch's threads)
    serial_rows = entry.serial_rows

    def local(n, frame):
        out = pyfunc.predict(frame)
        assert len(out) == n

    def local_threaded(n, frame):
        entry.serial_rows = 0
        try:
            local(n, frame)
        finally:
            entry.serial_rows = serial_rows

    def rest(n, body):
        out = _post(port, body)
        assert len(out["predictions"]) == n, out

    reps: list[dict] = []
    log_path = WORK / "serve.log"
    t0 = time.perf_counter()
    proc, port = start_server(model_uri, tracking, log_path, a.wait_s)
    start_s = time.perf_counter() - t0
    try:
        for r in range(a.reps):
            load = [round(x, 2) for x in os.getloadavg()]
            rest_s = measure(rest, bodies, requests, a.warmup if r == 0 else 1)
            local_s = measure(local, frames, requests, a.warmup if r == 0 else 1)
            threaded_s = measure(local_threaded, frames, requests, 1)
            reps.append({"loadavg": load, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                         "rest": {n: summarise(v, n) for n, v in rest_s.items()},
                         "in_process": {n: summarise(v, n) for n, v in local_s.items()},
                         "in_process_torch_threads": {n: summarise(v, n) for n, v in threaded_s.items()}})
            print(f"rep {r + 1}/{a.reps}: load {load[0]}  " + "  ".join(
                f"{n} rows: REST p50 {reps[-1]['rest'][n]['p50_ms']:.1f} ms, pyfunc "
                f"{reps[-1]['in_process'][n]['p50_ms']:.1f} ms" for n in sizes), flush=True)
    finally:
        stop_server(proc)

    payload = {"machine": machine(), "model_uri": model_uri, "requests_per_size_per_rep": requests,
               "reps": a.reps, "sizes": sizes, "server": "mlflow models serve --env-manager local (1 uvicorn worker)",
               "mlflow": mlflow.__version__, "server_start_s": start_s, "pyfunc_load_s": load_s,
               "serial_rows": serial_rows, "torch_threads": torch.get_num_threads(),
               "repetitions": reps}
    loads = [rp["loadavg"][0] for rp in reps]
    md = [f"# Serving latency: {a.reps} repetitions × {requests} sequential requests per size, sizes interleaved",
          "", f"`mlflow models serve -m {model_uri} --env-manager local` (MLflow {mlflow.__version__}, 1 worker), "
          f"`dataframe_split` JSON over urllib, one request in flight; in-process: `mlflow.pyfunc.load_model(uri)"
          f".predict(DataFrame)`. Cells: median over repetitions of the per-repetition figure (min–max).", "",
          f"Requests under {serial_rows:,} rows run on one intra-op thread (`jobs/pyfunc_model.py`); the last "
          f"column is the in-process pyfunc with torch's {torch.get_num_threads()} threads instead.", "",
          "| rows / request | REST p50 ms | REST p99 ms | REST rows/s (at p50) | in-process p50 ms | in-process p99 ms "
          "| server + HTTP + JSON (p50) | in-process p50 ms, torch's threads |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        rp = [x["rest"][n] for x in reps]
        ip = [x["in_process"][n] for x in reps]
        over = [x["rest"][n]["p50_ms"] - x["in_process"][n]["p50_ms"] for x in reps]
        md.append(f"| {n:,} | {_cell([x['p50_ms'] for x in rp])} | {_cell([x['p99_ms'] for x in rp])} | "
                  f"{_cell([x['rows_per_s'] for x in rp], '{:,.0f}')} | {_cell([x['p50_ms'] for x in ip])} | "
                  f"{_cell([x['p99_ms'] for x in ip])} | {_cell(over)} | "
                  f"{_cell([x['in_process_torch_threads'][n]['p50_ms'] for x in reps])} |")
    md += ["", f"Server start to first /ping: {start_s:.1f} s; pyfunc load in process: {load_s:.1f} s. "
           f"1-min load average at the start of each repetition: {', '.join(map(str, loads))} "
           f"({machine()['cores']} cores).", ""]
    write_results("serving" if not a.quick else "serving-quick", payload, "\n".join(md))


if __name__ == "__main__":
    main()
