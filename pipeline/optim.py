"""Optimizers: a sparse-aware one for embedding tables, Adam for everything else.

A dense optimizer over hashed tables touches every row every step (millions of rows for the few
thousand a batch uses). Row-wise Adagrad (TorchRec's default for tables) updates only the rows in
the gradient and keeps one accumulator per row instead of Adam's two full-size moments, so the
optimizer state of a 3.5M-row table is 14 MB instead of 450 MB.

Per-table L2 (`row_l2`: weight -> (first row of each table, coefficient)) is added to the gradient of
the rows a step touches, `g + l2 * w`, before either optimizer's update: sparse updates stay sparse,
and a row no batch looks up is never shrunk.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Literal

import torch
from torch import nn
from torch.optim.adam import adam as _functional_adam


def coalesce(grad: torch.Tensor) -> torch.Tensor:
    """A sparse row gradient with each row once (duplicates summed), marked coalesced.

    Same result as `Tensor.coalesce()` at about a third of the time on CPU: a batch's table
    gradient holds one entry per looked-up id (~140k for the standard workload, ~15k distinct),
    and torch's coalesce reduces the duplicates in a serial loop (~10 ms a step, a third of all
    non-MLP time), while unique + index_add run parallel kernels. Rows are sorted as int32 where
    the weight allows (a third faster than int64's sort on the standard workload)."""
    if grad.is_coalesced():
        return grad
    rows, values = grad._indices()[0], grad._values()
    narrow = rows.to(torch.int32) if grad.shape[0] < 2 ** 31 else rows
    uniq, inverse = torch.unique(narrow, sorted=True, return_inverse=True)
    uniq = uniq.long()
    summed = values.new_zeros(uniq.numel(), *values.shape[1:]).index_add_(0, inverse, values)
    return torch.sparse_coo_tensor(uniq.unsqueeze(0), summed, grad.shape, is_coalesced=True,
                                   check_invariants=False)


RowL2 = dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]]


def with_row_l2(p: torch.Tensor, grad: torch.Tensor, l2: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The coalesced sparse gradient plus `l2 * w` on its rows (each table's coefficient)."""
    if l2 is None:
        return grad
    starts, coefs = l2
    rows, values = grad.indices()[0], grad.values()
    coef = coefs.to(p.device)[torch.searchsorted(starts.to(p.device), rows, right=True) - 1]
    values = values + coef.to(values.dtype).unsqueeze(1) * p.detach().index_select(0, rows).to(values.dtype)
    return torch.sparse_coo_tensor(grad.indices(), values, grad.shape, is_coalesced=True, check_invariants=False)


_DISABLED = torch._disable_dynamo(lambda: None).__code__   # the code of torch's "not traced" wrapper


def _unwrapped(fn) -> object | None:
    """The function `torch._disable_dynamo` wrapped, or None where `fn` is not such a wrapper."""
    inner = getattr(fn, "__wrapped__", None)
    return inner if getattr(fn, "__code__", None) is _DISABLED and inner is not None else None


# Optimizer methods torch wraps with `torch._disable_dynamo` (zero_grad, state_dict, ...), unwrapped
_PLAIN_METHODS = {name: f for name, f in ((n, _unwrapped(fn)) for n, fn in vars(torch.optim.Optimizer).items()) if f}


def _closure(fn) -> list:
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:   # an empty cell
            pass
    return out


# the disabled functional `adam` that torch's Adam.step calls (inside torch's dispatch wrapper), unwrapped
_ADAM_INNER = [f for f in map(_unwrapped, _closure(_functional_adam)) if f]


class _Eager:
    """Optimizer methods without torch's dynamo wrapper, which imports torch._dynamo (1.4 s of CPU a
    process) on its first call only to build a "not traced" copy of the method. Nothing mtrank runs
    is traced, so the plain method is the same code. Class-local: torch's own classes, and any
    torch.compile in the same process, keep torch's wrappers."""


for _name, _fn in _PLAIN_METHODS.items():
    setattr(_Eager, _name, _fn)


class RowWiseAdagrad(_Eager, torch.optim.Optimizer):
    """Adagrad for sparse gradients with one squared-gradient accumulator per row.

    Duplicate ids in a batch are summed first (coalesce), so a row gets one update per step.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.05, eps: float = 1e-8,
                 initial_accumulator: float = 0.0, row_l2: RowL2 | None = None):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator": initial_accumulator})
        self.row_l2 = dict(row_l2 or {})   # not optimizer state: it comes from the spec, never from a checkpoint

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator"], dtype=torch.float32,
                                              device=p.device)
                grad = coalesce(p.grad if p.grad.is_sparse else p.grad.to_sparse(1))
                grad = with_row_l2(p, grad, self.row_l2.get(p))
                rows, values = grad.indices()[0], grad.values()
                acc = state["sum"].index_select(0, rows) + values.float().square().mean(1)
                state["sum"].index_copy_(0, rows, acc)
                step = values / (acc.sqrt() + group["eps"]).unsqueeze(1).to(values.dtype)
                # rows are unique (coalesced): a gather and a copy back, not index_add_'s scatter (3x slower)
                p.index_copy_(0, rows, p.index_select(0, rows).sub_(step.mul_(group["lr"])))
        return None


class SparseAdamL2(_Eager, torch.optim.SparseAdam):
    """torch's SparseAdam with the per-table L2 of the touched rows added to their gradient."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, row_l2: RowL2 | None = None):
        super().__init__(list(params), lr=lr)
        self.row_l2 = dict(row_l2 or {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p in self.row_l2:
                    p.grad = with_row_l2(p, coalesce(p.grad), self.row_l2[p])
        return super().step(closure)


def sparse_optimizer(params: list[nn.Parameter], kind: Literal["rowwise_adagrad", "adam"], lr: float,
                     initial_accumulator: float = 0.0, row_l2: RowL2 | None = None):
    """`row_l2`: FusedEmbeddings.row_l2() (weights without an L2 table are absent)."""
    if kind == "adam":
        return SparseAdamL2(params, lr=lr, row_l2=row_l2)
    return RowWiseAdagrad(params, lr=lr, initial_accumulator=initial_accumulator, row_l2=row_l2)


@contextlib.contextmanager
def _adam_without_dynamo_import():
    """For one step: torch's disabled functional `adam` is given itself as its cached "not traced"
    copy (what the wrapper looks up before importing dynamo), and the cache is removed afterwards,
    so nothing outlives the step. Skipped once torch._dynamo is loaded (its own path is then free)."""
    seeded = []
    if "torch._dynamo" not in sys.modules:
        for inner in _ADAM_INNER:
            if not hasattr(inner, "__dynamo_disable"):
                setattr(inner, "__dynamo_disable", inner)
                seeded.append(inner)
    try:
        yield
    finally:
        for inner in seeded:
            if getattr(inner, "__dynamo_disable", None) is inner:
                delattr(inner, "__dynamo_disable")


_ADAM_STEP = getattr(torch.optim.Adam.step, "__wrapped__", None)


class _EagerAdam(_Eager, torch.optim.Adam):
    """torch's Adam without its dynamo wrappers: the same `_init_group` and functional `adam` under
    no_grad, as torch's step runs them when `differentiable` is off (always, here)."""

    @torch.no_grad()
    def step(self, closure=None):
        with _adam_without_dynamo_import():
            return _ADAM_STEP(self, closure)


# a torch whose layout differs (a newer one): its own Adam, which only costs the import
_EAGER = bool(_PLAIN_METHODS) and bool(_ADAM_INNER) and _ADAM_STEP is not None


def dense_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of a chain of foreach ops (CPU-supported).
    cls = _EagerAdam if _EAGER else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
