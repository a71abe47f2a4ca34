"""Who this process is in a torchrun job, without importing torch: the CLI reads it for every
command (log format, error lines), and commands that never train (generate, validate, init-spec)
should not pay torch's import. The collectives themselves live in `pipeline.distributed`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def _tdist():
    import torch.distributed as tdist

    return tdist


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
        _tdist().all_gather_object(out, obj)
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj` in rank order on rank 0 (None elsewhere): large results, e.g. predictions."""
        if not self.enabled:
            return [obj]
        out: list | None = [None] * self.world_size if self.is_main else None
        _tdist().gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        _tdist().broadcast_object_list(box, src=0)
        return box[0]

    def active_ranks(self, has_batch: bool) -> int:
        import torch

        flag = torch.tensor([int(has_batch)], dtype=torch.int64)
        if self.enabled:
            _tdist().all_reduce(flag)
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
