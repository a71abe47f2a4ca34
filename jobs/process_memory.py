"""Keep freed memory in the process instead of handing it back to the kernel after every batch.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it
on free, and trims the heap's free top above 128 KiB. A ranker's forward allocates activations of
[batch, experts, width] floats (134 MB per expert layer at 16,384 rows × 8 × 256), so every batch
maps new pages and the kernel zeroes each 4 KiB page on first touch: 3.6–4.1 million page faults
per million scored rows, measured, and the forward ran 10–25 % slower than on a warm heap (the same
thing Intel's guidance fixes for CPU PyTorch with jemalloc or tcmalloc). Two `mallopt` calls give
glibc that behaviour: no mmap for large blocks (they come from the heap and are reused) and a trim
threshold high enough that the free top of the heap survives between batches.

The cost is resident memory: the process keeps up to `TRIM_BYTES` of freed heap (peak RSS is
unchanged; RSS stays nearer the peak). `MTRANK_KEEP_FREED_MEMORY=0` leaves glibc as it is.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "MTRANK_KEEP_FREED_MEMORY"
TRIM_BYTES = 1 << 30    # free heap top kept before glibc returns it (1 GiB: a few batches' activations)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks (see the module doc); False where it did nothing:
    not glibc, or turned off by MTRANK_KEEP_FREED_MEMORY=0. Process-wide; call once at start."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    except (OSError, AttributeError):
        return False
    log.debug("malloc keeps freed memory (%s=0 to turn off): %s", ENV, ok)
    return ok
