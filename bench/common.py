"""Benchmark plumbing: repeated timings as median (min-max), machine facts, result files.

Timings on a shared 2-core machine are noisy, so every figure that matters is a ratio between
things measured in the same run, each the median of >= 3 repetitions.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"
CACHE = Path(".mtrank/bench-data")


@dataclass
class Timing:
    name: str
    rows: int
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [self.rows / s for s in self.seconds]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def cell(self) -> str:
        r = self.rates
        return f"{self.median:,.0f} ({min(r):,.0f}-{max(r):,.0f})"


def repeat(name: str, rows: int, fn: Callable[[], object], reps: int = 3, warmup: bool = True) -> Timing:
    if warmup:
        fn()
    t = Timing(name, rows)
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.seconds.append(time.perf_counter() - t0)
    return t


def machine() -> dict:
    info = {"cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": sys.version.split()[0], "platform": platform.platform()}
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx"] = "amx_tile" in flags
    except (OSError, IndexError):
        pass
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process image.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child would
    report its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(module: str, *args: str) -> dict:
    """Run `python -m module args` in a fresh process (clean peak RSS); it prints one JSON line."""
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
