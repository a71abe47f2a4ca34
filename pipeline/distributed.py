"""Data-parallel training across processes started by torchrun: who this rank is, how gradients
meet, how ranks stay in step, and how they leave.

DDP wraps only the dense part of a ranker (bottom + towers, `models.DenseStage`). The embedding
tables stay outside it: their gradients are sparse (the rows a batch touched) and DDP cannot bucket
sparse gradients over gloo (torch 2.13 fails in backward with "Cannot access storage of
SparseTensorImpl"). Each table's gradient is coalesced and summed with one sparse all_reduce, so
what crosses the wire is the touched rows, never the table, and the gradient stays sparse for the
row-wise optimizer.

Ranks read disjoint shards, so they run out of batches at different steps (row groups differ in
size, bad rows are set aside). `lockstep` agrees on every step: a rank with no batch left takes a
zero-gradient step so that the collectives still match, and the ranks with data scale their loss so
the averaged gradient is the mean over the ranks that had one. The epoch ends when every rank is out.
"""
from __future__ import annotations

import datetime as dt
import gc
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger("mtrank.dist")
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the default is a single process (no collectives at all)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes checkpoints and outputs and talks to MLflow."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # -- collectives (no-ops for a single process) ---------------------------------------
    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order (picklable objects: accounting, stats, predictions)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj` in rank order on rank 0 (None elsewhere): large results, e.g. predictions."""
        if not self.enabled:
            return [obj]
        out: list | None = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def active_ranks(self, has_batch: bool) -> int:
        flag = torch.tensor([int(has_batch)], dtype=torch.int64)
        if self.enabled:
            tdist.all_reduce(flag)
        return int(flag.item())


SINGLE = Dist()


class PeerFailed(RuntimeError):
    """This rank's collective failed because another rank died; that rank reports the cause."""
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def from_env() -> Dist:
    """The rank torchrun (or any launcher setting RANK / WORLD_SIZE / LOCAL_RANK) gave this process."""
    if not under_torchrun():
        return SINGLE
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def backend() -> str:
    """gloo: the trainer keeps tensors on the CPU, where nccl cannot run (and nccl has no sparse
    all_reduce, which the tables' gradients need)."""
    return "gloo"


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
    (e.g. uncertainty-weighting log-variances, which live in the loss, outside the model)."""

    def __init__(self, d: Dist, tables: list[nn.Parameter], extras: list[nn.Parameter]):
        self.d, self.tables, self.extras = d, tables, extras
        self.rows_sent = 0   # touched rows summed over steps (what the sparse all_reduce carried)
        self.steps = 0

    @torch.no_grad()
    def __call__(self) -> None:
        if not self.d.enabled:
            return
        ws = self.d.world_size
        for w in self.tables:
            g = w.grad.coalesce() if w.grad is not None else empty_sparse_grad(w)
            tdist.all_reduce(g)              # gloo: a sparse sum; indices are merged, not densified
            g = g.coalesce()
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
