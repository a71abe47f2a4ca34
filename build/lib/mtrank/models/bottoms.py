"""Multi-task bottoms: shared-bottom, OMoE, MMoE and PLE over one input vector.

Every bottom returns `(features [T, B, H], gates)` where `gates` maps task -> softmax weights
[B, E] (None for shared-bottom), so evaluation can report expert utilisation. Experts are one
`BatchedMLP` (stacked weights, one `baddbmm` per layer): a Python loop per expert would launch
E small matmuls per layer and dominate step time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Gates = dict[str, torch.Tensor] | None


class BatchedMLP(nn.Module):
    """E independent MLPs evaluated together: [E, B, in] (or shared [B, in]) -> [E, B, out]."""

    def __init__(self, n: int, in_dim: int, sizes: tuple[int, ...], dropout: float = 0.0,
                 last_activation: bool = True):
        super().__init__()
        self.n, self.last_activation, self.dropout = n, last_activation, dropout
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for out_dim in sizes:
            bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per expert
            self.weights.append(nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, out_dim).uniform_(-bound, bound)))
            in_dim = out_dim
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            act = i < last or self.last_activation
            if x.dim() == 2:
                # One input shared by all E MLPs: their first layers are one wide GEMM
                # [B, in] @ [in, E*out], activation in that layout, then a [E, B, out] view.
                # fp32 bmm takes the strided view as is (a copy costs ~10% of the expert block);
                # bf16 bmm would gather it in backward (~25% of a step), so there one copy first.
                n, d_in, d_out = w.shape
                wide = w.permute(1, 0, 2).reshape(d_in, n * d_out)
                x = self._act(torch.addmm(b.reshape(1, n * d_out), x, wide), act)
                x = x.view(-1, n, d_out).transpose(0, 1)
                if torch.is_autocast_enabled("cpu") or x.dtype != torch.float32:
                    x = x.contiguous()
            else:
                x = self._act(torch.baddbmm(b, x, w), act)
        return x

    def _act(self, x: torch.Tensor, act: bool) -> torch.Tensor:
        if not act:
            return x
        x = F.relu_(x)  # in place: the pre-activation is not needed by any backward
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class BatchedLinear(nn.Module):
    """T independent linear maps (one gate per task): [T, B, in] -> [T, B, out]."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = BatchedMLP(n, in_dim, (out_dim,), last_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SharedBottom(nn.Module):
    """One MLP; every task sees the same features (the baseline MoE variants are judged against)."""

    def __init__(self, tasks: tuple[str, ...], in_dim: int, sizes: tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        self.tasks = tasks
        self.mlp = BatchedMLP(1, in_dim, sizes, dropout)
        self.out_dim = self.mlp.out_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Gates]:
        h = self.mlp(x)  # [1, B, H]
        return h.expand(len(self.tasks), -1, -1), None


class OMoE(nn.Module):
    """E experts mixed by one softmax gate shared by all tasks (Ma et al. 2018's one-gate baseline)."""

    def __init__(self, tasks: tuple[str, ...], in_dim: int, experts: int, sizes: tuple[int, ...],
                 dropout: float = 0.0):
        super().__init__()
        self.tasks = tasks
        self.experts = BatchedMLP(experts, in_dim, sizes, dropout)
        self.gate = nn.Linear(in_dim, experts)
        self.out_dim = self.experts.out_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Gates]:
        e = self.experts(x)                           # [E, B, H]
        g = torch.softmax(self.gate(x), dim=-1)       # [B, E]
        h = torch.einsum("be,ebh->bh", g, e)
        return h.unsqueeze(0).expand(len(self.tasks), -1, -1), {t: g for t in self.tasks}


class MMoE(nn.Module):
    """E shared experts, one softmax gate per task (Ma et al. KDD 2018); no extra shared bottom."""

    def __init__(self, tasks: tuple[str, ...], in_dim: int, experts: int, sizes: tuple[int, ...],
                 dropout: float = 0.0):
        super().__init__()
        self.tasks, self.n_experts = tasks, experts
        self.experts = BatchedMLP(experts, in_dim, sizes, dropout)
        self.gate = nn.Linear(in_dim, len(tasks) * experts)  # all task gates in one matmul
        self.out_dim = self.experts.out_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Gates]:
        e = self.experts(x)                                                         # [E, B, H]
        g = torch.softmax(self.gate(x).view(x.shape[0], len(self.tasks), self.n_experts), dim=-1)
        h = torch.einsum("bte,ebh->tbh", g, e)
        return h, {t: g[:, i] for i, t in enumerate(self.tasks)}


class _PLELevel(nn.Module):
    """One extraction layer: task experts read their task's input, shared experts the shared one."""

    def __init__(self, n_tasks: int, in_dim: int, task_experts: int, shared_experts: int,
                 sizes: tuple[int, ...], dropout: float, last: bool):
        super().__init__()
        self.T, self.Et, self.Es, self.last = n_tasks, task_experts, shared_experts, last
        n_all = n_tasks * task_experts + shared_experts
        # Rows 0..T*Et-1: task experts (task t owns rows t*Et..), then the shared experts.
        self.experts = BatchedMLP(n_all, in_dim, sizes, dropout)
        self.task_gates = BatchedLinear(n_tasks, in_dim, task_experts + shared_experts)
        self.shared_gate = None if last else nn.Linear(in_dim, n_all)
        own = torch.arange(n_tasks * task_experts).view(n_tasks, task_experts)
        shared = torch.arange(n_tasks * task_experts, n_all).expand(n_tasks, -1)
        self.register_buffer("select", torch.cat([own, shared], dim=1), persistent=False)  # [T, Et+Es]
        self.out_dim = self.experts.out_dim

    def forward(self, task_in: torch.Tensor, shared_in: torch.Tensor):
        """task_in [T, B, in], shared_in [B, in] -> task_out [T, B, H], shared_out [B, H] | None, gates."""
        b = shared_in.shape[0]
        ex_in = torch.cat([task_in.repeat_interleave(self.Et, dim=0),
                           shared_in.unsqueeze(0).expand(self.Es, b, -1)], dim=0)
        e = self.experts(ex_in)                                           # [E_all, B, H]
        g = torch.softmax(self.task_gates(task_in), dim=-1)               # [T, B, Et+Es]
        task_out = torch.einsum("tbe,tebh->tbh", g, e[self.select])
        shared_out = None
        if self.shared_gate is not None:
            gs = torch.softmax(self.shared_gate(shared_in), dim=-1)        # [B, E_all]
            shared_out = torch.einsum("be,ebh->bh", gs, e)
        return task_out, shared_out, g


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al. RecSys 2020): task + shared experts per level.

    Task gates mix their own experts with the shared ones; a shared gate over all experts feeds
    the next level's shared experts; the last level has no shared gate. Reported gates are the
    last level's task gates over [own task experts, shared experts].
    """

    def __init__(self, tasks: tuple[str, ...], in_dim: int, shared_experts: int, task_experts: int,
                 levels: int, sizes: tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        self.tasks = tasks
        mods = []
        for i in range(levels):
            lvl = _PLELevel(len(tasks), in_dim, task_experts, shared_experts, sizes, dropout,
                            last=i == levels - 1)
            mods.append(lvl)
            in_dim = lvl.out_dim
        self.levels = nn.ModuleList(mods)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Gates]:
        task_in, shared_in = x.unsqueeze(0).expand(len(self.tasks), -1, -1), x
        g = None
        for lvl in self.levels:
            task_in, shared_in, g = lvl(task_in, shared_in)
        return task_in, {t: g[i] for i, t in enumerate(self.tasks)}
