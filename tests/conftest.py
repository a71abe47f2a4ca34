import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from filelock import FileLock

from mtrank.features.spec import load_spec


_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _without_tracking_env():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI, and a job falls back to that
    variable when its config names no store: without this, a test that opened one store in-process
    would send later tests' subprocess jobs there. One fixture per scope, because a module or
    session fixture (a shared trained ranker) is set up before any function-scoped fixture runs."""
    saved = {k: os.environ.pop(k) for k in _TRACKING_ENV if k in os.environ}
    yield
    for k in _TRACKING_ENV:
        os.environ.pop(k, None)
    os.environ.update(saved)


_isolated_tracking_uri = pytest.fixture(autouse=True)(_without_tracking_env)
_isolated_tracking_uri_module = pytest.fixture(autouse=True, scope="module")(_without_tracking_env)
_isolated_tracking_uri_session = pytest.fixture(autouse=True, scope="session")(_without_tracking_env)


@pytest.fixture(scope="session")
def spec():
    return load_spec()


def make_frame(spec, n: int, seed: int = 0) -> pl.DataFrame:
    """A small valid frame for the given spec, built by hand (no generator): edge cases included."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pl.Series] = {spec.request_id: pl.Series([f"r{i // 5}" for i in range(n)])}
    for f in spec.categorical:
        vals = rng.integers(0, 50, n)
        if f.name in ("user_id", "item_id", "category_id"):
            s = pl.Series(f.name, vals, dtype=pl.Int64)
        else:
            s = pl.Series(f.name, [f"v{v}" for v in vals])
        cols[f.name] = s.scatter([0], [None]) if n > 1 and f.name != spec.group_key else s  # null id
    for f in spec.multi_hot:
        lists = [[str(x) for x in rng.integers(0, 30, rng.integers(0, 6))] for _ in range(n)]
        if n > 2:
            lists[1] = None
            lists[2] = ["7", None]
        cols[f.name] = pl.Series(f.name, lists, dtype=pl.List(pl.String))
    for f in spec.numeric:
        cols[f.name] = pl.Series(f.name, rng.gamma(2.0, 3.0, n))
    click = (rng.random(n) < 0.3).astype(np.int8)
    cols["click"] = pl.Series(click)
    for lab in ("conversion", "collect", "cart"):
        cols[lab] = pl.Series((click * (rng.random(n) < 0.5)).astype(np.int8))
    cols["stay_seconds"] = pl.Series((click * rng.exponential(30, n)).astype(np.float32))
    cols["true_p_click"] = pl.Series(rng.random(n))
    return pl.DataFrame(cols)


MTRANK = [sys.executable, "-m", "mtrank.jobs.cli"]


def generate_demo_logs(out, days: int, rows: int, seed: int, users: int, items: int) -> None:
    """Demo logs starting 2026-11-01, as `mtrank generate --out OUT --days .. --seed ..` writes them
    (the generator the command calls, in this process: a fixture need not pay a process start and
    its imports; `tests/test_cli.py` runs the command itself)."""
    from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

    generate_impressions(out, ImpressionConfig(seed=seed, start=dt.date(2026, 11, 1), days=days, rows_per_day=rows,
                                               n_users=users, n_items=items), progress=False)


def mtrank_in_process(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mtrank ARGS` through `main()` in this process, captured as a process's run would be (stdout,
    stderr with the log lines, exit code; an unexpected exception becomes a traceback on stderr and
    exit 1). For the error paths: a process start and its imports cost 2-5 s of CPU a call. Tests
    about a real process (signals, kills, imports, exit on a closed pipe) start the command itself."""
    import contextlib
    import io
    import logging
    import signal
    import traceback

    from mtrank.jobs.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, sigterm, here = root.level, signal.getsignal(signal.SIGTERM), os.getcwd()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if cwd is not None:
                os.chdir(cwd)
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:      # argparse's usage errors, sys.exit(143) on SIGTERM
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:            # what a process would print before dying with exit 1
                traceback.print_exc()
                rc = 1
    finally:
        mlflow = sys.modules.get("mlflow")
        left = mlflow.active_run() if mlflow is not None else None
        if left is not None:      # a process would end it at exit; here it would nest the next job's run
            mlflow.end_run("KILLED")
        os.chdir(here)
        signal.signal(signal.SIGTERM, sigterm)
        root.removeHandler(handler)
        root.setLevel(level)
        if torch is not None and "torch" in sys.modules:
            torch.set_num_threads(threads)
    assert left is None, f"mtrank {' '.join(map(str, args))} left MLflow run {left.info.run_id} active"
    return subprocess.CompletedProcess(["mtrank", *map(str, args)], rc, out.getvalue(), err.getvalue())


def cli_daily(base, config, date, *extra) -> subprocess.CompletedProcess:
    """`mtrank daily --config BASE/CONFIG --date DATE` through main() in this process (the tests
    that need a process of its own — concurrency, kill -9, torchrun — start one)."""
    return mtrank_in_process("daily", "--config", base / config, "--date", date, *extra)


def sqlite_client(base):
    """Client of the embedded store a job with `work_dir: work` under `base` writes to."""
    import mlflow

    uri = f"sqlite:///{(base / 'work' / 'mlflow.db').resolve()}"
    return mlflow.MlflowClient(uri, uri)


DEFAULT_SPEC = Path(__file__).parents[1] / "features" / "default_spec.yaml"
SMALL_MODEL = {"experts": 3, "expert_mlp": [32, 16], "tower_mlp": [8]}
# ESMM with the term kept out of the id tables and per-id biases (docs/training.md): the ranker fixture's
# model, so saving, registering, serving and scoring are tested with a model that has the biases
IDS_KEPT_OUT = {"tower_loss": "clicked", "tower_weight": 1.0, "tower_scope": "dense",
                "detach_tables": ["user_id", "item_id"], "id_bias": 0.2}


def small_spec(path: Path, max_buckets: int = 8192, dim: int | None = None, **top) -> Path:
    """The default spec with every table capped at `max_buckets` rows: ~10 MB of weights instead
    of 230 MB. Job tests save, checksum, upload and load models many times over; the features,
    tasks and rules stay those of the default. `top` sets top-level keys (e.g. on_bad_row)."""
    d = yaml.safe_load(DEFAULT_SPEC.read_text())
    for t in [*d.get("tables", {}).values(), *d["features"]]:
        if "buckets" in t:
            t["buckets"] = min(t["buckets"], max_buckets)
        if dim is not None and "dim" in t:
            t["dim"] = dim
    if dim is not None:
        d["embedding_dim"] = dim
    d.update(top)
    path.write_text(yaml.safe_dump(d))
    return path


def capped_spec(max_buckets: int = 16_384):
    """The default spec parsed with every table capped at `max_buckets` rows (in memory): for trainer
    tests whose properties do not depend on table size, ~20x fewer weights to initialise and
    checkpoint than the default's 58M."""
    from mtrank.features.spec import parse_spec

    d = yaml.safe_load(DEFAULT_SPEC.read_text())
    for t in [*d.get("tables", {}).values(), *d["features"]]:
        if "buckets" in t:
            t["buckets"] = min(t["buckets"], max_buckets)
    return parse_spec(d, f"default, tables capped at {max_buckets}")


def write_job(path: Path, name: str, train: dict, *, data: str = "logs", spec: str | None = "spec.yaml",
              window_days: int = 2, work_dir: str = "work", model: dict | None = None, **extra) -> Path:
    """A job config for the tests: a small model over `spec` (relative to the config's folder;
    None = the embedded default spec)."""
    cfg = {"name": name, "data": data, "spec": spec, "window_days": window_days, "work_dir": work_dir,
           "model": model or SMALL_MODEL, "train": train, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def other_names_spec():
    """A spec whose tasks are not the demo's: regression `watch_time` listed first, binary
    `click_through`, and `purchase` with click_through as entire-space parent (no product name)."""
    from mtrank.features.spec import parse_spec

    return parse_spec({
        "hash_seed": 1,
        "embedding_dim": 4,
        "features": [
            {"name": "user_id", "kind": "categorical", "buckets": 50},
            {"name": "item_id", "kind": "categorical", "buckets": 30},
            {"name": "age", "kind": "numeric", "fill": 0.0},
        ],
        "tasks": [
            {"name": "watch_time", "label": "stay_seconds", "type": "regression", "loss": "mse_log1p",
             "space": "click_through"},
            {"name": "click_through", "label": "click", "type": "binary"},
            {"name": "purchase", "label": "conversion", "type": "binary", "space": "click_through",
             "parent": "click_through"},
        ],
    })


RANKER_DATE = "2026-11-03"


# The longest modules (CPU of their processes and in-process work, `make test` on 2 cores,
# 2026-12-01), longest first. Under `--dist loadfile` a worker takes the next module when it is free:
# handing the long ones out first (the LPT rule) lets the short ones fill in at the end, so the two
# workers finish close together instead of one running a long module alone at the end (a list by
# number of tests instead left the MLflow-server and clean-venv modules last: +90 s).
LONGEST_FIRST = ("test_distributed", "test_portable_model", "test_faults", "test_fault_matrix", "test_trainer",
                 "test_s3", "test_one_version_per_date", "test_daily", "test_warm_start", "test_train_job",
                 "test_own_logs", "test_mlflow_server")   # measured 2026-12-01 (module wall time, slowest first)


def pytest_collection_modifyitems(config, items):
    """`make test` runs `-n 2 --dist loadfile`: a module runs whole on one worker, so its module-scoped
    fixture (a trained job, a server) is built once, not once per worker (`--dist loadgroup` with
    `xdist_group` marks would be finer, but pytest-xdist 3.8 cannot regroup under pytest 9's node
    ids). Modules are handed out in collection order (`--no-loadscope-reorder`: xdist would otherwise
    order them by their number of tests): LONGEST_FIRST, then those with end-to-end (slow) tests,
    then the rest."""
    def rank(item) -> tuple:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        known = LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)
        return known, 0 if item.get_closest_marker("slow") else 1
    items.sort(key=rank)   # stable: each module keeps its order


def shared_dir(tmp_path_factory, worker_id: str, name: str) -> Path:
    """A folder every xdist worker of this run sees (the workers' base temp folders share a parent)."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if worker_id != "master" else root) / name


@pytest.fixture(scope="session")
def ranker(tmp_path_factory, worker_id):
    """One trained and registered ranker shared by the job tests (built once per run, under a file
    lock, whichever worker asks first):
    4 days of generated logs (2026-11-01 .. 04), the small default spec, ESMM with per-id biases
    (`IDS_KEPT_OUT`: saved, registered and loaded with the model), a job `ranker` whose score
    section is the demo's formula and tuning objective, and `mtrank daily` for 2026-11-03 in a sqlite
    store under work/ (v1, champion). Treat it as read-only: a test that changes the registry or the
    files works on a copy (`shutil.copytree`) or writes its own job config pointing here."""
    base = shared_dir(tmp_path_factory, worker_id, "ranker")
    with FileLock(f"{base}.lock"):
        if (base / ".built").exists():
            return base
        shutil.rmtree(base, ignore_errors=True)   # what a worker that failed here left
        base.mkdir()
        generate_demo_logs(base / "logs", days=4, rows=20_000, seed=5, users=2000, items=800)
        small_spec(base / "spec.yaml")
        demo = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "default_job.yaml").read_text())
        write_job(base / "job.yaml", "ranker", {"batch_size": 1024, "epochs": 1, "lr": 0.003},
                  model={**SMALL_MODEL, "esmm": IDS_KEPT_OUT},   # per-id biases in every load
                  score={"fusion": demo["score"]["fusion"], "tune": demo["score"]["tune"]})
        r = cli_daily(base, "job.yaml", RANKER_DATE)
        assert r.returncode == 0, r.stderr
        (base / ".built").touch()
    return base
