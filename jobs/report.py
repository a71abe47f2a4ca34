"""The offline evaluation report: one self-contained HTML file (plots as inline SVG) + metrics.json.

Every figure is on its task's population (tasks on all rows and entire-space products over all
impressions, tasks with a `space` over that task's positives), with the population size beside it and the oracle figure
where the data carries the generator's true probabilities, and each AUC with its 95 % DeLong interval.
With a baseline (`mtrank evaluate --baseline`, or the champion once the promotion gate has scored
both on the same rows) the two models are shown side by side: deltas coloured by which way is
better, the baseline's ROC and reliability curves in each task's panel. Plots are small multiples,
one panel per task; with the trainer's history, train / validation loss per task too (validation
at the epoch ends, and every N steps with train.validate_every_steps). The plots are hand-written
SVG (`jobs/svg_plot.py`): a plotting library cost seconds per report in every daily run.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from mtrank.jobs.svg_plot import Panel, figure, viridis
from mtrank.pipeline.output_files import make_dirs, write_atomic_all

BINARY_COLS = [("rows", "rows", "{:,}"), ("positives", "positives", "{:,}"), ("auc", "AUC", "{:.4f}"),
               ("oracle_auc", "oracle AUC", "{:.4f}"), ("gauc", "GAUC", "{:.4f}"),
               ("oracle_gauc", "oracle GAUC", "{:.4f}"), ("logloss", "logloss", "{:.4f}"), ("ne", "NE", "{:.4f}"),
               ("mean_pred", "mean pred", "{:.4f}"), ("observed_rate", "observed", "{:.4f}"),
               ("pcoc", "PCOC", "{:.3f}"), ("pcoc_uncalibrated", "PCOC uncalibrated", "{:.3f}"),
               ("logloss_uncalibrated", "logloss uncalibrated", "{:.4f}")]
OPTIONAL_COLS = {"pcoc_uncalibrated", "logloss_uncalibrated"}   # shown only for a calibrated model
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


def _fmt(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return fmt.format(v)


def _num(v) -> float:
    """A figure as a float; None (a null read back from metrics.json) and non-numbers are NaN."""
    return float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else float("nan")


def _population(m: dict) -> str:
    return "all impressions" if m.get("population") == "all" else f"{m.get('population')} positives"


# Which way a delta is an improvement. Oracle figures belong to the data, not the model, and the
# counts and rates describe the population: those deltas stay uncoloured.
HIGHER_IS_BETTER = {"auc", "gauc", "r2"}
LOWER_IS_BETTER = {"logloss", "ne", "rmse", "rmse_log1p"}
CLOSER_TO_ONE = {"pcoc"}


def delta_class(key: str, value, base) -> str:
    """'better', 'worse' or '' for the delta of figure `key` from `base` to `value`."""
    v, b = _num(value), _num(base)
    if not (math.isfinite(v) and math.isfinite(b)) or v == b:
        return ""
    if key in HIGHER_IS_BETTER:
        better = v > b
    elif key in LOWER_IS_BETTER:
        better = v < b
    elif key in CLOSER_TO_ONE:
        if abs(v - 1) == abs(b - 1):
            return ""
        better = abs(v - 1) < abs(b - 1)
    else:
        return ""
    return "better" if better else "worse"


WITH_INTERVAL = {"auc", "pcoc"}   # `<key>_lo` / `<key>_hi`: DeLong for AUC, the day's noise for PCOC


def _cell(key: str, fmt: str, m: dict) -> str:
    text = _fmt(fmt, m.get(key))
    lo, hi = _num(m.get(f"{key}_lo")), _num(m.get(f"{key}_hi"))
    if key in WITH_INTERVAL and text != "–" and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    return f"<td>{text}</td>"


def metrics_table(metrics: dict, baseline: dict | None = None, baseline_label: str = "baseline") -> str:
    rows = []
    for kind, cols in (("binary", BINARY_COLS), ("regression", REGRESSION_COLS)):
        names = [n for n, m in metrics.items() if ("auc" in m) == (kind == "binary")]
        if not names:
            continue
        cols = [c for c in cols if c[0] not in OPTIONAL_COLS or any(c[0] in metrics[n] for n in names)]
        head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols)
        rows.append(f"<h3>{'Binary tasks and entire-space products' if kind == 'binary' else 'Regression'}</h3>"
                    f"<table><tr><th>task</th><th>population</th>{head}</tr>")
        for n in names:
            m = metrics[n]
            cells = "".join(_cell(k, fmt, m) for k, _, fmt in cols)
            rows.append(f"<tr><td><b>{html.escape(n)}</b></td><td>{_population(m)}</td>{cells}</tr>")
            if baseline and n in baseline:
                b = baseline[n]
                cells = "".join(_cell(k, fmt, b) for k, _, fmt in cols)
                rows.append(f"<tr class=base><td>{html.escape(baseline_label)}</td><td></td>{cells}</tr>")
                delta = []
                for k, _, _ in cols:
                    if isinstance(m.get(k), float) and isinstance(b.get(k), float):
                        c = delta_class(k, m[k], b[k])
                        delta.append(f"<td{' class=' + c if c else ''}>{_fmt('{:+.4f}', m[k] - b[k])}</td>")
                    else:
                        delta.append("<td></td>")
                rows.append(f"<tr class=delta><td>Δ</td><td></td>{''.join(delta)}</tr>")
        rows.append("</table>")
    return "\n".join(rows)


def _auc_label(label: str, m: dict | None) -> str:
    a = _num((m or {}).get("auc"))
    return f"{label} (AUC {a:.4f})" if math.isfinite(a) else label


def roc_figure(curves: dict, baseline_curves: dict | None = None, metrics: dict | None = None,
               baseline_metrics: dict | None = None, labels: tuple[str, str] = ("model", "baseline")) -> str:
    """ROC per task, the baseline's curve in the same panel; an <svg> element."""
    panels = []
    for name, c in curves.items():
        p = Panel(name, "false positive rate", "true positive rate", xlim=(0, 1), ylim=(0, 1), legend="lower right")
        p.line([0, 1], [0, 1], "reference")
        p.line(c["roc"]["fpr"], c["roc"]["tpr"], "model", _auc_label(labels[0], (metrics or {}).get(name)))
        b = (baseline_curves or {}).get(name)
        if b:
            p.line(b["roc"]["fpr"], b["roc"]["tpr"], "baseline",
                   _auc_label(labels[1], (baseline_metrics or {}).get(name)))
        panels.append(p)
    return figure("ROC (each on its population)", panels)


def reliability_figure(curves: dict, baseline_curves: dict | None = None,
                       labels: tuple[str, str] = ("model", "baseline")) -> str:
    """Reliability per task on equal-count bins, the baseline's beside the model's."""
    panels = []
    for name, c in curves.items():
        b = (baseline_curves or {}).get(name)
        cals = [(c["calibration"], labels[0], "model", "o")]
        if c.get("calibration_uncalibrated"):   # a calibrated model: its curve before the Platt layer
            cals.append((c["calibration_uncalibrated"], f"{labels[0]} before calibration", "raw", "^"))
        if b:
            cals.append((b["calibration"], labels[1], "baseline", "s"))
        hi = max([v for cal, *_ in cals for v in map(_num, cal["mean_pred"] + cal["observed"]) if math.isfinite(v)]
                 + [1e-6])
        p = Panel(name, "mean prediction", "observed rate", legend="upper left")
        p.line([0, hi], [0, hi], "reference")
        for cal, label, role, marker in cals:   # a legend only to tell several curves apart
            p.line(cal["mean_pred"], cal["observed"], role, label if len(cals) > 1 else None, marker)
        panels.append(p)
    return figure("Reliability (equal-count bins)", panels)


def histogram_figure(curves: dict) -> str:
    """Prediction histogram per task, positives against negatives, each as a share of its class
    (positives are rare: raw counts would flatten them); separation is what AUC measures."""
    panels = []
    for name, c in curves.items():
        h = c["histogram"]
        parts = ([("negatives", h["negatives"], "model"), ("positives", h["positives"], "alt")]
                 if "positives" in h else [("all rows", h["counts"], "model")])
        p = Panel(name, "predicted probability", "share of the class's rows")
        for label, counts, role in parts:
            counts = np.asarray(counts, np.float64)
            total = counts[np.isfinite(counts)].sum()
            if total:
                p.stairs(counts / total, h["edges"], role, f"{label} ({int(total):,})", cls=label.split()[0])
        panels.append(p)
    return figure("Prediction histograms", panels)


# train points every log_every_steps; validation at the epoch ends; validation every validate_every_steps
HISTORY_PARTS = ("train", "validation", "validation_steps")


def _history_tasks(history: dict) -> list[str]:
    """Task names in the order they first appear (they are data: any spec's names)."""
    seen: dict[str, None] = {}
    for part in HISTORY_PARTS:
        for e in history.get(part) or []:
            if isinstance(e, dict) and isinstance(e.get("loss"), dict):
                seen.update(dict.fromkeys(e["loss"]))
    return list(seen)


def has_history(history: dict | None) -> bool:
    """Whether there is a loss to draw (training may not have produced one: the section is left out)."""
    return isinstance(history, dict) and any(
        isinstance(e, dict) and isinstance(e.get("loss"), dict) and bool(e["loss"])
        for part in HISTORY_PARTS for e in (history.get(part) or []))


def _series(entries: list, task: str, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    pts = [(_num(e.get("step", i)), _num((e.get(key) or {}).get(task)))
           for i, e in enumerate(entries) if isinstance(e, dict)]
    pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    a = np.asarray(pts, np.float64).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def _in_step_order(*parts: list) -> list[dict]:
    """The entries of several parts of a history merged by step (entries without one last)."""
    entries = [e for part in parts for e in part or [] if isinstance(e, dict)]
    return sorted(entries, key=lambda e: _num(e.get("step")) if math.isfinite(_num(e.get("step"))) else math.inf)


def loss_figure(history: dict | None) -> str | None:
    """Train loss (running mean) against step with the validation loss at its step, one panel
    per task; None without a history. With validation points inside the epochs
    (train.validate_every_steps) the validation curve is a line through all of them, the epoch
    ends marked on it."""
    if not has_history(history):
        return None
    tasks = _history_tasks(history)
    train, val = history.get("train") or [], history.get("validation") or []
    steps = history.get("validation_steps") or []
    panels = []
    for task in tasks:
        p = Panel(task, "step", "loss")
        p.line(*_series(train, task), "model", "train (running mean)", cls="train")
        if steps:
            p.line(*_series(_in_step_order(val, steps), task), "alt", "validation", ".", cls="validation")
        p.line(*_series(val, task), "alt", "validation, epoch end" if steps else "validation", "D", join=False,
               cls="epoch-end")
        panels.append(p)
    return figure("Training and validation loss", panels)


def validation_table(history: dict | None) -> str:
    """Validation loss / AUC per epoch and task ('' without validation entries); with points inside
    the epochs (train.validate_every_steps) all of them in step order, an `at` column telling the
    epoch ends from the steps."""
    history = history if isinstance(history, dict) else {}
    val = [e for e in history.get("validation") or [] if isinstance(e, dict)]
    steps = [e for e in history.get("validation_steps") or [] if isinstance(e, dict)]
    if not val and not steps:
        return ""
    tasks = _history_tasks({"validation": val, "validation_steps": steps})
    head = "".join(f"<th>{html.escape(t)} loss</th><th>{html.escape(t)} AUC</th>" for t in tasks)
    at = {id(e): "step" for e in steps}
    rows = "".join(
        f"<tr><td>{_fmt('{}', e.get('epoch'))}</td><td>{_fmt('{:,}', e.get('step'))}</td>"
        + (f"<td>{at.get(id(e), 'epoch end')}</td>" if steps else "")
        + "".join(f"<td>{_fmt('{:.4f}', _num((e.get('loss') or {}).get(t)))}</td>"
                  f"<td>{_fmt('{:.4f}', _num((e.get('auc') or {}).get(t)))}</td>" for t in tasks) + "</tr>"
        for e in (_in_step_order(val, steps) if steps else val))
    return (f"<table><tr><th>epoch</th><th>step</th>{'<th>at</th>' if steps else ''}{head}</tr>{rows}"
            "</table>")


def gates_figure(gates: dict[str, list[float]]) -> str | None:
    """Mean gate weight per task (row) and expert (column), the value written in each cell, beside
    a colour scale from 0 to the largest weight; None without gates."""
    if not gates:
        return None
    rows = [[_num(v) for v in gates[t]] for t in gates]
    n = max(map(len, rows))
    top = max([v for r in rows for v in r if math.isfinite(v)] + [0.0]) or 1.0
    size = (44 * n, 24 * len(rows))
    heat = Panel("", "expert", "", xlim=(-0.5, n - 0.5), ylim=(len(rows) - 0.5, -0.5),
                 xticks=[(j, f"e{j}") for j in range(n)], yticks=list(enumerate(gates)), size=size)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            finite = math.isfinite(v)
            heat.box(j - 0.5, i - 0.5, j + 0.5, i + 0.5, viridis(v / top) if finite else "none",
                     f"{v:.2f}" if finite else "–", "#fff" if finite and v < top / 2 else "#000")
    scale = Panel("", xlim=(0, 1), ylim=(0, top), xticks=[], size=(12, size[1]))
    for k in range(32):
        scale.box(0, top * k / 32, 1, top * (k + 1) / 32, viridis((k + 0.5) / 32))
    return figure("Mean gate weight per task and expert", [heat, scale], cols=2)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}th{background:#f3f3f3}
tr.base td{color:#666}tr.delta td{color:#036;font-style:italic}tr.delta td.better{color:#1a7f37;font-weight:bold}
tr.delta td.worse{color:#cf222e;font-weight:bold}figure{margin:1em 0}svg{max-width:100%;height:auto}
code{background:#f3f3f3}"""


def render(title: str, meta: dict, metrics: dict, curves: dict, gates: dict | None,
           baseline: dict | None = None, baseline_curves: dict | None = None, history: dict | None = None,
           labels: tuple[str, str] = ("model", "baseline"), gate: dict | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>"
                                 f"<code>{html.escape(json.dumps(v, default=str))}</code></td></tr>"
                                 for k, v in meta.items()) + "</table>",
             "<h2>Metrics</h2>", metrics_table(metrics, baseline, labels[1]),
             "<p>AUC is exact over the whole evaluation set (ties averaged), with its 95 % DeLong interval in "
             "brackets. GAUC: per-group AUC (groups: the "
             "spec's group_key, see 'GAUC groups' above) weighted by impressions, groups with one class excluded. NE: logloss / entropy of the observed rate. "
             "PCOC: mean prediction / observed rate. Oracle: the generator's true probabilities as the score."
             + (f" Δ: this model − {html.escape(labels[1])}, <span style='color:#1a7f37'>green</span> better, "
                "<span style='color:#cf222e'>red</span> worse (PCOC: closer to 1 is better)." if baseline else "")
             + "</p>"]
    if curves:
        base = baseline_curves if baseline_curves else None
        parts += ["<h2>ROC</h2>", f"<figure>{roc_figure(curves, base, metrics, baseline, labels)}</figure>",
                  "<h2>Calibration</h2>", f"<figure>{reliability_figure(curves, base, labels)}</figure>",
                  "<h2>Predictions</h2>", f"<figure>{histogram_figure(curves)}</figure>"]
    loss = loss_figure(history)
    if loss is not None:
        parts += ["<h2 id=loss>Training and validation loss</h2>", f"<figure>{loss}</figure>",
                  validation_table(history)]
    g = gates_figure(gates or {})
    if g is not None:
        parts += ["<h2>Expert utilisation</h2>", f"<figure>{g}</figure>"]
    if gate is not None:
        parts.append(gate_section(gate))
    parts.append("</body></html>")
    return "\n".join(parts)


def gauc_note(group_key: str | None) -> str:
    """What the report says about GAUC: its group column, or why it is absent."""
    return group_key if group_key else "none: the spec has no group_key, so GAUC is omitted"


def served_note(served: dict) -> dict:
    """The report's line on features serving sets (`serve_value`), {} when there are none."""
    if not served:
        return {}
    values = ", ".join(f"{k} = {v!r}" for k, v in served.items())
    return {"set when ranking": f"{values} (serve_value); the figures here read the logged values "
                                "(AUC as served: beside them)"}


def write_report(out_dir: str | Path, title: str, meta: dict, metrics: dict, curves: dict,
                 gates: dict | None, baseline: dict | None = None, baseline_curves: dict | None = None,
                 history: dict | None = None, labels: tuple[str, str] = ("model", "baseline"),
                 gate: dict | None = None) -> tuple[Path, Path]:
    """report.html + metrics.json (+ gate.json with `gate`), written atomically together (never half
    a file under either name; a failure such as a full disk leaves the previous files, or nothing,
    and raises OutputError). `history`: the trainer's loss history, drawn when it has entries;
    `labels`: the model's and the baseline's names in the table and the plots."""
    out = make_dirs(out_dir)
    page = render(title, meta, metrics, curves, gates, baseline, baseline_curves, history, labels, gate)
    payload = {"title": title, "meta": meta, "tasks": metrics, "baseline": baseline,
               "labels": list(labels), "gates": gates, "history": history if has_history(history) else None}
    files = {out / "report.html": page.encode(),   # all complete, then all renamed
             out / "metrics.json": strict_json(payload)}
    if gate is not None:
        files[out / "gate.json"] = strict_json(gate)
    write_atomic_all(files)
    return out / "report.html", out / "metrics.json"


def compare_report(report_dir: str | Path, metrics: dict, curves: dict, baseline: dict, baseline_curves: dict,
                   labels: tuple[str, str], gate: dict, meta: dict | None = None) -> list[Path]:
    """The report of a run re-rendered beside a baseline (the champion, scored on the same rows as
    the model), with the gate's section: title, meta, expert gates and history come from the
    report's metrics.json. A report without a readable metrics.json gets only the gate section
    (`add_gate`). Returns the files written."""
    report_dir = Path(report_dir)
    try:
        old = json.loads((report_dir / "metrics.json").read_text())
        title = old["title"]
    except (OSError, ValueError, KeyError, TypeError):
        return add_gate(report_dir, gate)
    write_report(report_dir, title, {**(old.get("meta") or {}), **(meta or {})}, metrics, curves, old.get("gates"),
                 baseline, baseline_curves, old.get("history"), labels, gate)
    return [report_dir / "gate.json", report_dir / "report.html", report_dir / "metrics.json"]


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
