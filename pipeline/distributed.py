"""Data-parallel training across processes started by torchrun: who this rank is, how gradients
meet, how ranks stay in step, and how they leave.

DDP wraps only the dense part of a ranker (bottom + towers, `models.DenseStage`). The embedding
tables stay outside it: their gradients are sparse (the rows a batch touched) and DDP cannot bucket
sparse gradients over gloo (torch 2.13 fails in backward with "Cannot access storage of
SparseTensorImpl"). Each table's gradient is coalesced and summed over ranks as a sparse tensor
(gloo's sparse all_reduce on the CPU, an all_gather of (row, gradient) pairs where nccl carries CUDA
tables), so what crosses the wire is the touched rows, never the table, and the gradient stays
sparse for the row-wise optimizer.

Ranks read disjoint shards, so they run out of batches at different steps (row groups differ in
size, bad rows are set aside). `lockstep` agrees on every step: a rank with no batch left takes a
zero-gradient step so that the collectives still match, and the ranks with data scale their loss so
the averaged gradient is the mean over the ranks that had one. The epoch ends when every rank is out.
"""
from __future__ import annotations

import datetime as dt
import gc
import logging
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from mtrank.pipeline.optim import coalesce
from mtrank.pipeline.ranks import SINGLE, Dist, PeerFailed, from_env

log = logging.getLogger("mtrank.dist")
T = TypeVar("T")


def resolve_device(want: str, d: Dist = SINGLE) -> torch.device:
    """Where this rank trains: `auto` takes this rank's GPU when CUDA is present, else the CPU."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device: cuda, but torch sees no CUDA device on this machine "
                         "(use auto or cpu)")
    if d.local_rank >= torch.cuda.device_count():
        raise ValueError(f"{d}: local rank {d.local_rank} has no GPU of its own "
                         f"({torch.cuda.device_count()} visible); start at most that many ranks per node")
    return torch.device("cuda", d.local_rank)


def backend() -> str:
    """gloo for CPU tensors; with CUDA present, nccl for CUDA tensors as well (one group, routed by
    the tensor's device), so the small CPU collectives (lockstep flags, objects) stay on gloo."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group(timeout_minutes: float = 30.0) -> Iterator[Dist]:
    """Join the job's process group for the duration of a block, and leave it cleanly.

    Leaving: everything that holds the DDP model must already be released by the block (it is
    local to the training function); collecting before `destroy_process_group` matters, because a
    DDP reducer still alive at that point aborts the process (SIGABRT) in a fair share of runs. On
    success the ranks meet at a barrier first, so none tears the group down under another.
    """
    d = from_env()
    if not d.enabled:
        yield d
        return
    if torch.cuda.is_available() and d.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(d.local_rank)   # nccl and DDP use the current device
    tdist.init_process_group(backend(), timeout=dt.timedelta(minutes=timeout_minutes))
    log.info("joined the process group: %s (backend %s)", d, backend())
    ok = False
    try:
        yield d
        ok = True
    except RuntimeError as e:
        if isinstance(e, tdist.DistError) or "closed by peer" in str(e) or "Connection reset" in str(e):
            raise PeerFailed(f"{d}: another rank of the job stopped (its error is in its own log lines); "
                             f"leaving too ({str(e).splitlines()[0][:200]})") from None
        raise
    finally:
        gc.collect()
        if ok:
            tdist.barrier()
        try:
            tdist.destroy_process_group()
        except RuntimeError:   # the group is already broken when a peer died: nothing left to tear down
            if ok:
                raise


def lockstep(batches: Iterable[T], d: Dist) -> Iterator[tuple[T | None, int]]:
    """(batch or None, ranks that have a batch) until every rank has run out; one tiny all_reduce a step."""
    it = iter(batches)
    while True:
        b = next(it, None)
        active = d.active_ranks(b is not None) if d.enabled else int(b is not None)
        if active == 0:
            return
        yield b, active


def empty_sparse_grad(weight: torch.Tensor) -> torch.Tensor:
    """A sparse gradient with no rows: what a rank with no batch contributes for a table."""
    return torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), weight.new_empty(0, *weight.shape[1:]),
                                   weight.shape)


class GradientSync:
    """Averages the gradients DDP does not see: the tables' (sparse) and any small dense extras
    (e.g. uncertainty-weighting log-variances, which live in the loss, outside the model).

    Two ways to sum a sparse gradient over ranks, the same result either way:
    - `all_reduce`: gloo's sparse all_reduce (CPU tensors); indices are merged, not densified.
    - `all_gather`: every rank's (row, gradient) pairs, padded to the longest, gathered and
      coalesced locally. nccl has no sparse all_reduce, so CUDA tables take this path.
    """

    MODES = ("all_reduce", "all_gather")

    def __init__(self, d: Dist, tables: list[nn.Parameter], extras: list[nn.Parameter], mode: str | None = None):
        self.d, self.tables, self.extras = d, tables, extras
        on_gpu = any(w.is_cuda for w in tables)
        self.mode = mode or ("all_gather" if on_gpu else "all_reduce")
        if self.mode not in self.MODES:
            raise ValueError(f"sparse sync mode {self.mode!r}: expected one of {self.MODES}")
        self.rows_sent = 0   # touched rows summed over steps (what the sparse sync carried)
        self.steps = 0

    @torch.no_grad()
    def __call__(self) -> None:
        if not self.d.enabled:
            return
        ws = self.d.world_size
        for w in self.tables:
            g = coalesce(w.grad) if w.grad is not None else empty_sparse_grad(w)
            g = sparse_all_reduce(g) if self.mode == "all_reduce" else sparse_all_gather_sum(g, ws)
            self.rows_sent += g.indices().shape[1]
            w.grad = g / ws
        if self.extras:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in self.extras])
            tdist.all_reduce(flat)
            flat /= ws
            for p, g in zip(self.extras, flat.split([p.numel() for p in self.extras])):
                p.grad = g.view_as(p).clone()
        self.steps += 1


def sparse_all_reduce(g: torch.Tensor) -> torch.Tensor:
    tdist.all_reduce(g)
    return coalesce(g)


def sparse_all_gather_sum(g: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum over ranks of a coalesced sparse gradient with dense collectives only: three
    all_gathers (row counts, rows, values), padding each rank's part to the longest."""
    rows, values = g.indices()[0], g.values()
    count = torch.tensor([rows.numel()], dtype=torch.long, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    tdist.all_gather(counts, count)
    n = [int(c.item()) for c in counts]
    pad = max(n) - rows.numel()
    rows = torch.cat([rows, rows.new_zeros(pad)])
    values = torch.cat([values, values.new_zeros(pad, *values.shape[1:])])
    all_rows = [torch.empty_like(rows) for _ in range(world_size)]
    all_values = [torch.empty_like(values) for _ in range(world_size)]
    tdist.all_gather(all_rows, rows)
    tdist.all_gather(all_values, values)
    idx = torch.cat([r[:k] for r, k in zip(all_rows, n)]).unsqueeze(0)
    val = torch.cat([v[:k] for v, k in zip(all_values, n)])
    return coalesce(torch.sparse_coo_tensor(idx, val, g.shape))
