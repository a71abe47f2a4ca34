"""`mtrank` keeps freed memory for the next batch instead of page-faulting fresh pages each time.

Counted, not timed: a loop that allocates and frees a 64 MB tensor (an activation of a scoring
batch is twice that) page-faults on every pass under glibc's default (the block is mmapped and
unmapped) and, after a few passes in which the heap settles, never once the process keeps freed
memory. Each case runs in its own process, since the setting is process-wide.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's")

# allocate and free a 64 MB tensor: 20 passes to let the heap settle, then count the faults of 10 more
FAULT_LOOP = """
import json, resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
before = faults()
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""
PAGES = 10 * (64 << 20) // 4096              # 163,840 pages of 4 KiB touched in the counted passes

PROBE = """
from mtrank.jobs.process_memory import keep_freed_memory
applied = keep_freed_memory()
""" + FAULT_LOOP

LOAD_PYFUNC = """
import sys, types
from mtrank.jobs.pyfunc_model import RankerPyfunc
RankerPyfunc().load_context(types.SimpleNamespace(artifacts={"model": sys.argv[1]}))
applied = None
""" + FAULT_LOOP


def _env(**env: str) -> dict:
    """This process's environment without the user's own setting of the switch, plus `env`."""
    return {**{k: v for k, v in os.environ.items() if k != "MTRANK_KEEP_FREED_MEMORY"}, **env}


def _run(code: str, *args: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(**env))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_not_faulted_in_again():
    kept = _run(PROBE)
    default = _run(PROBE, MTRANK_KEEP_FREED_MEMORY="0")
    assert kept["applied"] and not default["applied"]
    assert default["faults"] > PAGES // 4, default          # the default maps the block again each pass
    assert kept["faults"] < PAGES // 50, kept               # reused: a few hundred faults at most


def test_the_cli_sets_it_at_start(tmp_path):
    """`mtrank` applies it before any command runs (logged at debug); the environment switch turns
    it off for a run."""
    from tests.conftest import MTRANK

    args = [*MTRANK, "-v", "validate", "--data", str(tmp_path / "no-such-logs")]
    on = subprocess.run(args, capture_output=True, text=True, env=_env())
    off = subprocess.run(args, capture_output=True, text=True, env=_env(MTRANK_KEEP_FREED_MEMORY="0"))
    assert "malloc keeps freed memory (MTRANK_KEEP_FREED_MEMORY=0 to turn off): True" in on.stderr, on.stderr[-2000:]
    assert "malloc keeps freed memory" not in off.stderr
    assert on.returncode == off.returncode == 2   # the command itself ran: the missing data directory is its error


LOAD_PYFUNC = """
import json, resource, sys, types, torch
from mtrank.jobs.pyfunc_model import RankerPyfunc
RankerPyfunc().load_context(types.SimpleNamespace(artifacts={"model": sys.argv[1]}))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
before = faults()
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
print(json.dumps({"faults": faults() - before}))
"""


def test_the_pyfunc_keeps_freed_memory_only_when_asked(tmp_path):
    """Loading the registered model leaves the host's allocator alone unless MTRANK_KEEP_FREED_MEMORY=1."""
    import datetime as dt

    import polars as pl
    import pyarrow.parquet as pq

    from mtrank.features.numeric import NumericStats
    from mtrank.features.spec import load_spec
    from mtrank.jobs.model_io import save_model
    from mtrank.models import ModelConfig
    from mtrank.pipeline.synthetic import ImpressionConfig, generate_impressions
    from mtrank.pipeline.trainer import build_model
    from tests.conftest import small_spec

    spec = load_spec(small_spec(tmp_path / "spec.yaml", max_buckets=256))
    generate_impressions(tmp_path / "logs", ImpressionConfig(seed=3, start=dt.date(2026, 11, 1), days=1,
                                                             rows_per_day=500), progress=False)
    logs = pl.concat([pl.from_arrow(pq.read_table(f)) for f in sorted((tmp_path / "logs").rglob("*.parquet"))])
    stats = NumericStats.of_frame(logs, spec)
    tiny = ModelConfig(experts=2, expert_mlp=(8,), tower_mlp=(4,))
    save_model(tmp_path / "model", build_model(spec, tiny, 0, stats), spec, stats)

    model = str(tmp_path / "model")
    assert _run(LOAD_PYFUNC, model)["faults"] > PAGES // 4                                 # the host's default kept
    assert _run(LOAD_PYFUNC, model, MTRANK_KEEP_FREED_MEMORY="1")["faults"] < PAGES // 50  # asked for
