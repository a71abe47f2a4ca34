"""Starting a data-parallel job: `mtrank train --nproc N` re-runs itself under torchrun.

torchrun is PyTorch's own launcher (rendezvous, rank environment, restart and teardown of failed
workers); this only spares a single-machine user from spelling it. Several machines call torchrun
directly (README, "Scale-out").
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger("mtrank.launch")


def without_option(argv: list[str], option: str) -> list[str]:
    """argv with `option VALUE` / `option=VALUE` removed (so the workers do not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def torchrun(nproc: int, argv: list[str]) -> int:
    """Run `mtrank ARGV` as `nproc` ranks on this machine; the exit status is torchrun's (0 only if
    every rank finished cleanly)."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mtrank.jobs.cli", *without_option(argv, "--nproc")]
    log.info("launching %d ranks (%s threads each): %s", nproc, env["OMP_NUM_THREADS"], " ".join(cmd))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        log.error("torchrun exited with status %d: a rank failed (its error is above)", rc)
    return rc
