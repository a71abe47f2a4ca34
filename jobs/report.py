"""The offline evaluation report: one self-contained HTML file (plots embedded) + metrics.json.

Every figure is on its task's population (tasks on all rows and entire-space products over all
impressions, tasks with a `space` over that task's positives), with the population size beside it and the oracle figure
where the data carries the generator's true probabilities. With a baseline the two models are
shown side by side with deltas.
"""
from __future__ import annotations

import base64
import math
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtrank.pipeline.checkpoint import make_dirs, write_atomic_all  # noqa: E402

BINARY_COLS = [("rows", "rows", "{:,}"), ("positives", "positives", "{:,}"), ("auc", "AUC", "{:.4f}"),
               ("oracle_auc", "oracle AUC", "{:.4f}"), ("gauc", "GAUC", "{:.4f}"),
               ("oracle_gauc", "oracle GAUC", "{:.4f}"), ("logloss", "logloss", "{:.4f}"), ("ne", "NE", "{:.4f}"),
               ("mean_pred", "mean pred", "{:.4f}"), ("observed_rate", "observed", "{:.4f}"),
               ("pcoc", "PCOC", "{:.3f}")]
REGRESSION_COLS = [("rows", "rows", "{:,}"), ("rmse", "RMSE (s)", "{:.2f}"), ("r2", "R²", "{:.4f}"),
                   ("rmse_log1p", "RMSE log1p", "{:.4f}"), ("oracle_rmse", "oracle RMSE (s)", "{:.2f}")]


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def strict_json(obj, indent: int | None = 1) -> bytes:
    """JSON any parser reads: an undefined figure (NaN, ±inf) is `null`, never a bare `NaN`."""
    return json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False).encode()


def undefined_figures(metrics: dict) -> list[str]:
    """`task.metric` of every figure that is undefined on this day (e.g. AUC without positives)."""
    return [f"{task}.{k}" for task, m in metrics.items() for k, v in m.items()
            if isinstance(v, float) and not math.isfinite(v)]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return fmt.format(v)


def _population(m: dict) -> str:
    return "all impressions" if m.get("population") == "all" else f"{m.get('population')} positives"


def metrics_table(metrics: dict, baseline: dict | None = None) -> str:
    rows = []
    for kind, cols in (("binary", BINARY_COLS), ("regression", REGRESSION_COLS)):
        names = [n for n, m in metrics.items() if ("auc" in m) == (kind == "binary")]
        if not names:
            continue
        head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols)
        rows.append(f"<h3>{'Binary tasks and entire-space products' if kind == 'binary' else 'Regression'}</h3>"
                    f"<table><tr><th>task</th><th>population</th>{head}</tr>")
        for n in names:
            m = metrics[n]
            cells = "".join(f"<td>{_fmt(fmt, m.get(k))}</td>" for k, _, fmt in cols)
            rows.append(f"<tr><td><b>{html.escape(n)}</b></td><td>{_population(m)}</td>{cells}</tr>")
            if baseline and n in baseline:
                b = baseline[n]
                cells = "".join(f"<td>{_fmt(fmt, b.get(k))}</td>" for k, _, fmt in cols)
                rows.append(f"<tr class=base><td>baseline</td><td></td>{cells}</tr>")
                delta = "".join(
                    f"<td>{_fmt('{:+.4f}', m[k] - b[k]) if isinstance(m.get(k), float) and isinstance(b.get(k), float) else ''}</td>"
                    for k, _, _ in cols)
                rows.append(f"<tr class=delta><td>Δ</td><td></td>{delta}</tr>")
        rows.append("</table>")
    return "\n".join(rows)


def roc_figure(curves: dict) -> str:
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, c in curves.items():
        if c["roc"]["fpr"]:
            ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (each on its population)")
    ax.legend(fontsize=8)
    return _png(fig)


def reliability_figure(curves: dict) -> str:
    n = len(curves)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, c) in zip(axes.flat, curves.items()):
        cal = c["calibration"]
        hi = max(cal["mean_pred"] + cal["observed"] + [1e-6])
        ax.plot([0, hi], [0, hi], "k:", lw=0.8)
        ax.plot(cal["mean_pred"], cal["observed"], "o-", ms=3)
        ax.set(title=name, xlabel="mean prediction", ylabel="observed rate")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Reliability (equal-count bins)")
    fig.tight_layout()
    return _png(fig)


def histogram_figure(curves: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        h = c["histogram"]
        centers = (np.array(h["edges"][:-1]) + np.array(h["edges"][1:])) / 2
        ax.plot(centers, np.maximum(h["counts"], 0.5), label=name)
    ax.set(yscale="log", xlabel="predicted probability", ylabel="rows", title="Prediction histograms")
    ax.legend(fontsize=8)
    return _png(fig)


def gates_figure(gates: dict[str, list[float]]) -> str | None:
    if not gates:
        return None
    tasks = list(gates)
    mat = np.array([gates[t] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * mat.shape[1], 0.6 + 0.45 * len(tasks)))
    im = ax.imshow(mat, cmap="viridis", aspect="auto", vmin=0)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(mat.shape[1]), [f"e{i}" for i in range(mat.shape[1])])
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if mat[i, j] < mat.max() / 2 else "k")
    ax.set_title("Mean gate weight per task and expert")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}th{background:#f3f3f3}
tr.base td{color:#666}tr.delta td{color:#036;font-style:italic}img{max-width:100%}code{background:#f3f3f3}"""


def render(title: str, meta: dict, metrics: dict, curves: dict, gates: dict | None,
           baseline: dict | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>"
                                 f"<code>{html.escape(json.dumps(v, default=str))}</code></td></tr>"
                                 for k, v in meta.items()) + "</table>",
             "<h2>Metrics</h2>", metrics_table(metrics, baseline),
             "<p>AUC is exact over the whole evaluation set (ties averaged). GAUC: per-group AUC (groups: the "
             "spec's group_key, see 'GAUC groups' above) weighted by impressions, groups with one class excluded. NE: logloss / entropy of the observed rate. "
             "PCOC: mean prediction / observed rate. Oracle: the generator's true probabilities as the score.</p>",
             "<h2>ROC</h2>", f"<img src='{roc_figure(curves)}'>",
             "<h2>Calibration</h2>", f"<img src='{reliability_figure(curves)}'>",
             "<h2>Predictions</h2>", f"<img src='{histogram_figure(curves)}'>"]
    g = gates_figure(gates or {})
    if g:
        parts += ["<h2>Expert utilisation</h2>", f"<img src='{g}'>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def gauc_note(group_key: str | None) -> str:
    """What the report says about GAUC: its group column, or why it is absent."""
    return group_key if group_key else "none: the spec has no group_key, so GAUC is omitted"


def write_report(out_dir: str | Path, title: str, meta: dict, metrics: dict, curves: dict,
                 gates: dict | None, baseline: dict | None = None) -> tuple[Path, Path]:
    """report.html + metrics.json, written atomically together (never half a file under either name;
    a failure such as a full disk leaves the previous pair, or nothing, and raises OutputError)."""
    out = make_dirs(out_dir)
    page = render(title, meta, metrics, curves, gates, baseline)
    payload = {"meta": meta, "tasks": metrics, "baseline": baseline, "gates": gates}
    write_atomic_all({out / "report.html": page.encode(),   # both complete, then both renamed
                      out / "metrics.json": strict_json(payload)})
    return out / "report.html", out / "metrics.json"


GATE_START, GATE_END = "<section id='gate'>", "</section><!-- gate -->"


def gate_section(gate: dict) -> str:
    """The promotion decision as an HTML section: each figure's AUCs, delta, interval, bound, outcome."""
    head = "".join(f"<th>{h}</th>" for h in ("figure", "population", "positives", "negatives", "AUC challenger",
                                             "AUC champion", "delta", "CI", "bound", "tolerance", "outcome"))
    colour = {"pass": "#1a7f37", "fail": "#cf222e", "undefined": "#9a6700"}
    rows = []
    for f in gate.get("figures", []):
        num = lambda v, fmt="{:+.4f}": _fmt(fmt, v)  # noqa: E731
        ci = "–" if f.get("ci_lower") is None else f"[{f['ci_lower']:+.4f}, {f['ci_upper']:+.4f}]"
        rows.append(f"<tr><td>{html.escape(f['name'])}</td><td>{html.escape(str(f['population']))}</td>"
                    f"<td>{f['positives']:,}</td><td>{f['negatives']:,}</td>"
                    f"<td>{num(f['auc_challenger'], '{:.4f}')}</td><td>{num(f['auc_champion'], '{:.4f}')}</td>"
                    f"<td>{num(f['delta'])}</td><td>{ci}</td><td>{num(f['bound'])}</td><td>{f['tolerance']:g}</td>"
                    f"<td style='color:{colour.get(f['outcome'], '#000')};font-weight:bold'>{f['outcome']}</td></tr>")
    verdict = "promoted to champion" if gate.get("promoted") else "not promoted"
    champion = gate.get("champion_version")
    return (f"{GATE_START}<h2>Promotion gate: {verdict}</h2>"
            f"<p>{'vs champion v' + html.escape(str(champion)) if champion else 'first version: no champion'}"
            f" on {html.escape(str(gate.get('date')))}. Rule: {html.escape(str(gate.get('rule', '')))}</p>"
            + (f"<table><tr>{head}</tr>{''.join(rows)}</table>" if rows else "")
            + f"<p><code>{html.escape(str(gate.get('reason', '')))}</code></p>{GATE_END}")


def add_gate(report_dir: str | Path, gate: dict) -> list[Path]:
    """gate.json beside the report, and the gate's section in report.html (replacing an earlier one),
    written atomically together; returns the files written."""
    report_dir = Path(report_dir)
    files = {report_dir / "gate.json": strict_json(gate)}
    page_path = report_dir / "report.html"
    if page_path.exists():
        page = page_path.read_text()
        if GATE_START in page:
            start = page.index(GATE_START)
            page = page[:start] + page[page.index(GATE_END, start) + len(GATE_END):]
        files[page_path] = page.replace("</body>", gate_section(gate) + "\n</body>", 1).encode()
    write_atomic_all(files)
    return list(files)
