"""Shared-bottom vs OMoE vs MMoE on the MMoE paper's synthetic data (Ma et al., KDD 2018, Fig. 4).

Why: the paper's central claim is that per-task gates make MMoE robust to weakly related tasks,
where a shared bottom (and a single-gate OMoE) degrades. The synthetic generator sets task
relatedness with one number, so this checks that claim on our own bottoms, with nothing else
(features, embeddings, data pipeline) in the way.

Setup as in the paper where it says, small where it does not: input dim 100, two regression
tasks, loss = sum of the two tasks' MSE, Adam; 8 experts of one ReLU layer of 16 units, towers
of one 8-unit layer, shared-bottom width chosen so its parameter count matches MMoE's. Data set
size, batch size, learning rate and step count are ours (sized for a 2-core machine). Single
thread: the matmuls are tiny, and one thread makes each run reproducible.

`python -m bench.mmoe_paper_bench [--quick]`; results in bench/results/mmoe_paper.{json,md,png}.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from bench.common import RESULTS, machine, write_results
from mtrank.models.bottoms import MMoE, OMoE, BatchedMLP, SharedBottom
from mtrank.pipeline.synthetic.mmoe_regression import mmoe_synthetic

TASKS = ("y1", "y2")
DIM = 100
EXPERTS, EXPERT_UNITS, TOWER_UNITS = 8, 16, 8
CORRELATIONS = (1.0, 0.9, 0.5)
MODELS = ("shared_bottom", "omoe", "mmoe")
LABELS = {"shared_bottom": "Shared-Bottom", "omoe": "OMoE", "mmoe": "MMoE"}
COLORS = {"shared_bottom": "tab:red", "omoe": "tab:green", "mmoe": "tab:blue"}


class TwoTaskNet(nn.Module):
    """Bottom -> one tower per task (as models/ranker.py builds them) -> predictions [B, T]."""

    def __init__(self, bottom: nn.Module):
        super().__init__()
        self.bottom = bottom
        self.towers = BatchedMLP(len(TASKS), bottom.out_dim, (TOWER_UNITS, 1), last_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.bottom(x)
        return self.towers(h).squeeze(-1).T


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shared_bottom_width() -> int:
    """Width of the one-layer shared bottom whose whole model is closest in size to MMoE's."""
    target = n_params(TwoTaskNet(MMoE(TASKS, DIM, EXPERTS, (EXPERT_UNITS,))))
    return min(range(EXPERT_UNITS, 4 * EXPERTS * EXPERT_UNITS),
               key=lambda h: abs(n_params(TwoTaskNet(SharedBottom(TASKS, DIM, (h,)))) - target))


def build(name: str, sb_width: int) -> TwoTaskNet:
    if name == "shared_bottom":
        return TwoTaskNet(SharedBottom(TASKS, DIM, (sb_width,)))
    if name == "omoe":
        return TwoTaskNet(OMoE(TASKS, DIM, EXPERTS, (EXPERT_UNITS,)))
    return TwoTaskNet(MMoE(TASKS, DIM, EXPERTS, (EXPERT_UNITS,)))


def make_data(correlation: float, seed: int, n_train: int, n_test: int) -> dict:
    x, y = mmoe_synthetic(n_train + n_test, correlation, dim=DIM, seed=seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return {"x": x[:n_train], "y": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:],
            "label_corr": float(np.corrcoef(y[:, 0], y[:, 1])[0, 1])}


def summed_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean(dim=0).sum()


def train(model: TwoTaskNet, data: dict, seed: int, args) -> dict:
    """Adam on random mini-batches; returns the training-loss curve (mean per log window) and
    the final test loss. The batch order is seeded, so a run is a function of `seed`."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data["x"]), (args.steps, args.batch), generator=gen)
    losses = torch.empty(args.steps)
    for step in range(args.steps):
        b = idx[step]
        loss = summed_mse(model(data["x"][b]), data["y"][b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.detach()
    with torch.no_grad():
        test = summed_mse(model(data["x_test"]), data["y_test"]).item()
    curve = losses.view(-1, args.log_every).mean(dim=1)
    tail = losses[-max(args.steps // 10, 1):].mean().item()
    return {"curve": curve.tolist(), "test_loss": test, "train_tail": tail}


def run_all(args) -> dict:
    sb_width = shared_bottom_width()
    params = {m: n_params(build(m, sb_width)) for m in MODELS}
    runs: dict = {str(c): {m: [] for m in MODELS} for c in CORRELATIONS}
    label_corr: dict = {str(c): [] for c in CORRELATIONS}
    for c in CORRELATIONS:
        for seed in range(args.seeds):
            data = make_data(c, seed, args.n_train, args.n_test)
            label_corr[str(c)].append(data["label_corr"])
            for m in MODELS:
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                r = train(build(m, sb_width), data, seed, args)
                r["seconds"] = time.perf_counter() - t0
                runs[str(c)][m].append(r)
                print(f"corr={c} seed={seed} {m:14s} test={r['test_loss']:.4f} "
                      f"train_tail={r['train_tail']:.4f} ({r['seconds']:.1f}s)", flush=True)
    return {"sb_width": sb_width, "params": params, "runs": runs, "label_corr": label_corr}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(res: dict) -> dict:
    """{corr: {model: {test: (mean, std), train_tail: (mean, std)}}} plus the ordering verdicts."""
    table: dict = {}
    for c, by_model in res["runs"].items():
        table[c] = {m: {k: mean_std([r[k] for r in rs]) for k in ("test_loss", "train_tail")}
                    for m, rs in by_model.items()}
    order = {c: t["mmoe"]["test_loss"][0] <= t["omoe"]["test_loss"][0] <= t["shared_bottom"]["test_loss"][0]
             for c, t in table.items()}
    return {"table": table, "ordering_held": order, "wins": paired_wins(res["runs"])}


def paired_wins(runs: dict) -> dict:
    """Seeds on which the first model's test loss beat the second's (same data, same seed):
    the spread over seeds is mostly data difficulty, which a paired count takes out."""
    pairs = (("mmoe", "omoe"), ("mmoe", "shared_bottom"), ("omoe", "shared_bottom"))
    return {c: {f"{a}<{b}": sum(ra["test_loss"] < rb["test_loss"] for ra, rb in zip(bm[a], bm[b]))
                for a, b in pairs} for c, bm in runs.items()}


def plot(res: dict, summary: dict, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    axes = axes.ravel()
    steps = (np.arange(args.steps // args.log_every) + 1) * args.log_every
    for ax, c in zip(axes, res["runs"]):
        for m in MODELS:
            curves = np.array([r["curve"] for r in res["runs"][c][m]])
            ax.plot(steps, curves.mean(axis=0), color=COLORS[m], label=LABELS[m])
            ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=COLORS[m], alpha=0.12)
        ax.set(title=f"correlation = {c}", xlabel="training step", ylabel="training loss (sum of MSE)",
               yscale="log")
        ax.legend()
    lims = [ax.get_ylim() for ax in axes[:len(CORRELATIONS)]]
    for ax in axes[:len(CORRELATIONS)]:
        ax.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
    ax = axes[len(CORRELATIONS)]
    width = 0.8 / len(MODELS)
    xs = np.arange(len(CORRELATIONS))
    for i, m in enumerate(MODELS):
        mu = [summary["table"][c][m]["test_loss"][0] for c in res["runs"]]
        sd = [summary["table"][c][m]["test_loss"][1] for c in res["runs"]]
        ax.bar(xs + (i - 1) * width, mu, width, yerr=sd, capsize=3, color=COLORS[m], label=LABELS[m])
    ax.set(xticks=xs, xticklabels=list(res["runs"]), xlabel="correlation",
           ylabel="final test loss (sum of MSE)", title=f"final test loss, mean ± std ({args.seeds} seeds)")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "mmoe_paper.png", dpi=110)
    plt.close(fig)


def markdown(res: dict, summary: dict, args, seconds: float) -> str:
    fmt = lambda ms: f"{ms[0]:.4f} ± {ms[1]:.4f}"  # noqa: E731
    lines = [f"## MMoE paper synthetic study (Ma et al. 2018, Fig. 4){' — quick' if args.quick else ''}",
             "",
             f"machine: {machine()['cores']} cores, 1 torch thread; {args.seeds} seeds, {args.steps} Adam steps "
             f"(lr {args.lr}, batch {args.batch}), {args.n_train:,} train / {args.n_test:,} test rows; "
             f"run time {seconds:.0f} s",
             "",
             "loss = MSE(task 1) + MSE(task 2); test = held-out rows after the last step; "
             "train = mean mini-batch loss over the last 10% of steps. Mean ± std over seeds.",
             "",
             "| correlation | label corr | model | test loss | train loss (last 10%) |",
             "|---|---|---|---|---|"]
    for c, t in summary["table"].items():
        lc = statistics.fmean(res["label_corr"][c])
        for m in MODELS:
            lines.append(f"| {c} | {lc:.2f} | {LABELS[m]} | {fmt(t[m]['test_loss'])} | {fmt(t[m]['train_tail'])} |")
    lines += ["", "| model | parameters |", "|---|---|"]
    width = {"shared_bottom": f" (width {res['sb_width']})"}
    lines += [f"| {LABELS[m]}{width.get(m, '')} | {p:,} |" for m, p in res["params"].items()]
    lines += ["", "expected (paper): MMoE ≤ OMoE ≤ Shared-Bottom, gap growing as correlation falls.", ""]
    for c, held in summary["ordering_held"].items():
        t = summary["table"][c]
        order = " < ".join(LABELS[m] for m in sorted(MODELS, key=lambda m: t[m]["test_loss"][0]))
        wins = ", ".join(f"{LABELS[k.split('<')[0]]} < {LABELS[k.split('<')[1]]} on {v}/{args.seeds}"
                         for k, v in summary["wins"][c].items())
        lines.append(f"- correlation {c}: ordering {'held' if held else 'did NOT hold'} "
                     f"(mean test loss: {order}); paired by seed: {wins}")
    lines += ["", "plot: bench/results/mmoe_paper.png (training-loss curves per correlation, mean over seeds, band = min-max; "
              "bar chart of final test loss)", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, fewer steps (development check)")
    p.add_argument("--seeds", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=5_000)
    args = p.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.steps = args.steps or (1_000 if args.quick else 3_000)
    args.log_every = max(args.steps // 100, 1)
    args.steps -= args.steps % args.log_every
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = run_all(args)
    summary = summarise(res)
    seconds = time.perf_counter() - t0
    plot(res, summary, args)
    payload = {"machine": machine(), "config": dict(vars(args)),
               "seconds": seconds, "params": res["params"], "shared_bottom_width": res["sb_width"],
               "label_corr": res["label_corr"], "summary": summary,
               "curves": {c: {m: [r["curve"] for r in rs] for m, rs in bm.items()} for c, bm in res["runs"].items()}}
    write_results("mmoe_paper", payload, markdown(res, summary, args, seconds))


if __name__ == "__main__":
    main()
