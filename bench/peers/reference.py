"""Compute reference: the standard workload's MMoE with nothing but the MLP work (BENCHMARKS.md).

The same experts / gates / towers as the peers and mtrank (8 experts [256, 128], 5 softmax gates,
5 towers [64] -> 1), fed pre-built random "embeddings" from memory: one [N, 28*16 + 8 = 456]
float tensor and random labels, made before the clock starts; no lookup, no I/O, no shuffling.
Experts are stacked weights: layer 1 of all 8 experts is one GEMM (456 -> 8*256), layer 2 and the
towers are bmm over stacked weights, the 5 gates one small GEMM (456 -> 5*8). The input requires grad, so backward also does
the input-gradient GEMM a real embedding path needs. Adam lr 1e-3, batch 4096, BCE (4 binary tasks)
+ MSE (stay), one pass. Its samples/s is the ceiling for this MLP on this CPU; `--bf16` runs the
forward under torch.autocast("cpu", bfloat16). No AUC (random data).

    .venv/bin/python -m bench.peers.reference [--rows 1000000] [--bf16]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import peak_rss_mb

FIELDS, DIM, DENSE = 28, 16, 8
EXPERTS, HIDDEN, TASKS, TOWER = 8, (256, 128), 5, 64
BINARY = [0, 1, 3, 4]            # ctr, cvr, collect, cart; task 2 (stay) is regression
BATCH, LR = 4096, 1e-3


class StackedMMoE(nn.Module):
    def __init__(self, d_in: int = FIELDS * DIM + DENSE):
        super().__init__()
        h1, h2 = HIDDEN

        def param(*shape: int, fan_in: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))

        self.w1, self.b1 = param(d_in, EXPERTS * h1, fan_in=d_in), param(EXPERTS * h1, fan_in=d_in)
        self.wg, self.bg = param(d_in, TASKS * EXPERTS, fan_in=d_in), param(TASKS * EXPERTS, fan_in=d_in)
        self.w2, self.b2 = param(EXPERTS, h1, h2, fan_in=h1), param(EXPERTS, 1, h2, fan_in=h1)
        self.wt, self.bt = param(TASKS, h2, TOWER, fan_in=h2), param(TASKS, 1, TOWER, fan_in=h2)
        self.wo, self.bo = param(TASKS, TOWER, 1, fan_in=TOWER), param(TASKS, 1, 1, fan_in=TOWER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h1 = x.shape[0], HIDDEN[0]
        e = F.relu(torch.addmm(self.b1, x, self.w1)).view(b, EXPERTS, h1)      # [B, 8, 256]
        e = F.relu(torch.baddbmm(self.b2, e.transpose(0, 1), self.w2))         # [8, B, 128]
        g = torch.addmm(self.bg, x, self.wg).view(b, TASKS, EXPERTS).softmax(-1)  # [B, 5, 8]
        mixed = torch.bmm(g, e.transpose(0, 1)).transpose(0, 1)                # [5, B, 128]
        t = F.relu(torch.baddbmm(self.bt, mixed, self.wt))                     # [5, B, 64]
        return torch.baddbmm(self.bo, t, self.wo).squeeze(-1).t()              # [B, 5] logits


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, y = logits.float(), y.float()
    bce = F.binary_cross_entropy_with_logits(logits[:, BINARY], y[:, BINARY])
    return bce + 0.2 * F.mse_loss(logits[:, 2], y[:, 2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--bf16", action="store_true", help="forward under torch.autocast('cpu', bfloat16)")
    a = p.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    x = torch.randn(a.rows, FIELDS * DIM + DENSE)
    y = (torch.rand(a.rows, TASKS) < 0.05).float()
    y[:, 2] = torch.rand(a.rows) * 3
    model = StackedMMoE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    prep = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(0, a.rows, BATCH):
        xb = x[i:i + BATCH].requires_grad_()        # stands in for looked-up embeddings
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            logits = model(xb)
        loss = loss_fn(logits, y[i:i + BATCH])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0

    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "name": f"compute reference ({'bf16 autocast' if a.bf16 else 'fp32'})", "rows_trained": a.rows,
        "seconds": round(seconds, 3), "samples_per_s": round(a.rows / seconds, 1), "prep_seconds": round(prep, 3),
        "auc": {}, "peak_rss_mb": round(peak_rss_mb(), 1),
        "settings": {"torch": torch.__version__, "threads": torch.get_num_threads(), "bf16": a.bf16,
                     "input": f"random [rows, {FIELDS * DIM + DENSE}] fp32 in memory, requires grad",
                     "model": "8 experts [256,128] + 5 softmax gates (one fused GEMM), 5 towers [64]->1 (bmm)",
                     "params": params, "loss": "BCE x4 + 0.2 * MSE, all rows", "final_loss": round(loss.item(), 4)},
    }), flush=True)


if __name__ == "__main__":
    main()
