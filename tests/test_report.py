"""The offline report on real metrics: two models' predictions of one synthetic day go through the
real `task_metrics` / `task_curves` (a spec whose task names are nobody's default), and the
written HTML / metrics.json are read back: AUC intervals, the baseline in the plots, coloured
deltas, one histogram panel per task, the loss curves, the champion comparison with its gate."""
import json
import subprocess
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mtrank.jobs.config import PromoteConfig
from mtrank.jobs.promote import compare
from mtrank.jobs.report import (GATE_START, add_gate, compare_report, delta_class, histogram_figure, loss_figure,
                                reliability_figure, roc_figure, write_report)
from mtrank.pipeline.evaluate import Predictions, binary_sets, task_curves, task_metrics
from tests.conftest import MTRANK, RANKER_DATE, other_names_spec

SPEC = other_names_spec()   # watch_time (regression), click_through, purchase, click_through_purchase


def day(noise: float, seed: int, n: int = 20_000, buy_rate: float = 0.1) -> Predictions:
    """One day's labels (fixed) and a model's outputs: more `noise`, a worse ranker."""
    rng = np.random.default_rng(0)
    click = rng.random(n) < 0.2
    buy = click & (rng.random(n) < buy_rate)
    stay = click * rng.exponential(30, n)
    model = np.random.default_rng(seed)

    def sigmoid(y):
        return 1 / (1 + np.exp(-(1.5 * y - 2 + model.normal(0, noise, n))))

    pc, pb = sigmoid(click), sigmoid(buy)
    outputs = {"p_click_through": pc, "p_purchase": pb, "p_click_through_purchase": pc * pb,
               "watch_time": np.abs(stay + model.normal(0, 10 * noise, n))}
    labels = {"click_through": click.astype(np.int8), "purchase": buy.astype(np.int8), "watch_time": stay}
    masks = {"click_through": np.ones(n, bool), "purchase": click, "watch_time": click}
    return Predictions(outputs, labels, masks, {}, None, {}, n)


@pytest.fixture(scope="module")
def pair():
    good, bad = day(1.0, 1), day(2.5, 2)
    return {"good": (task_metrics(good, SPEC), task_curves(good, SPEC), good),
            "bad": (task_metrics(bad, SPEC), task_curves(bad, SPEC), bad)}


TASKS = ["click through", "watch/time ✓", "x"]   # names are data


def history(validation: bool = True) -> dict:
    train = [{"step": s, "epoch": s // 400, "samples": s * 4096,
              "loss": {t: 1.0 / (i + 1) - s / 10_000 for i, t in enumerate(TASKS)}} for s in range(100, 1300, 100)]
    val = [{"epoch": e, "step": 400 * (e + 1), "loss": {t: 0.9 / (i + 1) for i, t in enumerate(TASKS[:2])},
            "auc": {t: 0.7 + e / 100 for t in TASKS[:2]}} for e in range(3)]
    return {"train": train, "validation": val if validation else []}


class Page(HTMLParser):
    """Tables as rows of (class, [(cell text, cell class)]), headers as lists; images; h2 titles."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.imgs, self.h2, self._row, self._cell, self._h2 = [], [], [], None, None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self._row = (a.get("class", ""), [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", a.get("class", "")]
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "h2":
            self._h2 = True
            self.h2.append("")

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        if self._h2:
            self.h2[-1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[1].append(tuple(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "h2":
            self._h2 = False

    def table_of(self, task: str) -> dict[str, dict[str, tuple[str, str]]]:
        """{'model' | 'base' | 'delta': {column header: (text, class)}} of one task's rows."""
        header = None
        for i, (_, cells) in enumerate(self.rows):
            if cells and cells[0][0] == "task":
                header = [c[0] for c in cells]
            elif cells and cells[0][0] == task:
                out = {"model": dict(zip(header, cells))}
                for cls, more in self.rows[i + 1:i + 3]:
                    if cls in ("base", "delta"):
                        out[cls] = dict(zip(header, more))
                return out
        raise KeyError(task)


def strict(path):
    """metrics.json as a strict parser reads it: a bare NaN is an error."""
    def no_constant(c):
        raise ValueError(c)
    return json.loads(path.read_text(), parse_constant=no_constant)


def test_auc_interval_brackets_the_auc_in_the_table_and_metrics_json(pair, tmp_path):
    metrics, curves, _ = pair["good"]
    binary = [n for n, m in metrics.items() if "auc" in m]
    assert binary == ["click_through", "purchase", "click_through_purchase"]
    for n in binary:
        m = metrics[n]
        assert 0 < m["auc_lo"] < m["auc"] < m["auc_hi"] < 1, (n, m)
    # the rarer the positives, the wider the interval
    width = {n: metrics[n]["auc_hi"] - metrics[n]["auc_lo"] for n in binary}
    assert width["click_through"] < width["purchase"]
    html_path, json_path = write_report(tmp_path, "day", {"date": "2026-11-03"}, metrics, curves, None)
    saved = strict(json_path)
    page = Page(html_path.read_text())
    for n in binary:
        m = metrics[n]
        assert (saved["tasks"][n]["auc_lo"], saved["tasks"][n]["auc_hi"]) == (m["auc_lo"], m["auc_hi"])
        assert page.table_of(n)["model"]["AUC"][0] == f"{m['auc']:.4f} [{m['auc_lo']:.4f}, {m['auc_hi']:.4f}]"
    assert "auc_lo" not in metrics["watch_time"]


def _panels(fig):
    return [ax for ax in fig.axes if ax.axison]


def test_baseline_is_drawn_in_every_roc_and_reliability_panel(pair):
    (m, c, _), (bm, bc, _) = pair["good"], pair["bad"]
    labels = ("challenger v2", "champion v1")
    fig = roc_figure(c, bc, m, bm, labels)
    try:
        assert [ax.get_title() for ax in _panels(fig)] == list(c)      # one panel per figure
        for ax, name in zip(_panels(fig), c):
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert legend == [f"challenger v2 (AUC {m[name]['auc']:.4f})", f"champion v1 (AUC {bm[name]['auc']:.4f})"]
            assert len(ax.lines) == 3                                   # chance diagonal, model, champion
            fpr, tpr = ax.lines[2].get_data()
            assert list(fpr) == bc[name]["roc"]["fpr"] and list(tpr) == bc[name]["roc"]["tpr"]
    finally:
        plt.close(fig)
    fig = reliability_figure(c, bc, labels)
    try:
        for ax, name in zip(_panels(fig), c):
            assert [t.get_text() for t in ax.get_legend().get_texts()] == list(labels)
            assert list(ax.lines[2].get_xdata()) == bc[name]["calibration"]["mean_pred"]
    finally:
        plt.close(fig)
    # a calibrated model also shows its curve before the Platt layer
    calibrated = {name: {**v, "calibration_uncalibrated": bc[name]["calibration"]} for name, v in c.items()}
    fig = reliability_figure(calibrated)
    try:
        for ax, name in zip(_panels(fig), c):
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model", "model before calibration"]
            assert list(ax.lines[2].get_xdata()) == bc[name]["calibration"]["mean_pred"]
    finally:
        plt.close(fig)
    fig = roc_figure(c)                                                 # no baseline: the model alone
    try:
        assert all(len(ax.lines) == 2 and len(ax.get_legend().get_texts()) == 1 for ax in _panels(fig))
    finally:
        plt.close(fig)


def test_deltas_are_coloured_by_which_way_is_better(pair, tmp_path):
    (m, c, _), (bm, bc, _) = pair["good"], pair["bad"]
    neutral = ("rows", "positives", "mean pred", "observed", "oracle AUC")
    for (model, base), expect in (((m, bm), "better"), ((bm, m), "worse")):
        html_path, _ = write_report(tmp_path / expect, "day", {}, model, c, None, base, bc)
        page = Page(html_path.read_text())
        for n in ("click_through", "purchase", "click_through_purchase"):
            rows = page.table_of(n)
            assert rows["base"]["task"][0] == "baseline"
            delta = rows["delta"]
            for col in ("AUC", "logloss", "NE"):
                assert delta[col][1] == expect, (n, col, delta[col])
            assert delta["AUC"][0] == f"{model[n]['auc'] - base[n]['auc']:+.4f}"
            assert delta["PCOC"][1] == delta_class("pcoc", model[n]["pcoc"], base[n]["pcoc"]) != ""
            assert all(delta[col][1] == "" for col in neutral), delta
        reg = page.table_of("watch_time")["delta"]
        assert reg["RMSE (s)"][1] == reg["R²"][1] == expect
    assert delta_class("pcoc", 1.05, 0.90) == "better" and delta_class("pcoc", 0.8, 1.1) == "worse"
    assert delta_class("logloss", 0.3, 0.4) == "better" and delta_class("ne", 0.9, 0.8) == "worse"
    assert delta_class("r2", 0.5, 0.4) == "better" and delta_class("gauc", 0.6, 0.7) == "worse"
    assert delta_class("auc", 0.7, 0.7) == delta_class("auc", float("nan"), 0.7) == delta_class("rows", 5, 4) == ""


def test_one_histogram_panel_per_task_positives_against_negatives(pair):
    metrics, curves, _ = pair["good"]
    for n, cur in curves.items():
        h = cur["histogram"]
        assert sum(h["positives"]) == metrics[n]["positives"] and sum(h["counts"]) == metrics[n]["rows"]
        assert len(h["edges"]) == len(h["counts"]) + 1 and h["edges"][-1] <= 1.0
    assert curves["click_through_purchase"]["histogram"]["edges"][-1] < 0.9   # a rare product: bins where it scores
    many = {f"task {i}": curves[n] for i, n in enumerate(list(curves) * 2)}  # 6 figures: a 4 x 2 grid
    for cur in (curves, many):
        fig = histogram_figure(cur)
        try:
            panels = _panels(fig)
            assert [ax.get_title() for ax in panels] == list(cur)
            ax = panels[1]
            name = list(curves)[1]
            pos = metrics[name]["positives"]
            assert [t.get_text() for t in ax.get_legend().get_texts()] == [
                f"negatives ({metrics[name]['rows'] - pos:,})", f"positives ({pos:,})"]
        finally:
            plt.close(fig)


def test_loss_section_is_there_iff_a_history_is(pair, tmp_path):
    metrics, curves, _ = pair["good"]
    hist = history()
    fig = loss_figure(hist)
    try:
        panels = _panels(fig)
        assert [ax.get_title() for ax in panels] == TASKS                   # one per task, names as given
        train, val = panels[0].lines
        assert list(train.get_xdata()) == [e["step"] for e in hist["train"]]
        assert list(val.get_xdata()) == [400, 800, 1200] and list(val.get_ydata()) == [0.9] * 3
        assert len(panels[2].lines) == 1                                    # no validation for task "x"
    finally:
        plt.close(fig)
    html_path, json_path = write_report(tmp_path / "with", "day", {}, metrics, curves, None, history=hist)
    page = Page(html_path.read_text())
    assert "Training and validation loss" in page.h2 and len(page.imgs) == 4
    assert strict(json_path)["history"] == hist
    epochs = [cells for _, cells in page.rows if cells and cells[0][0] in ("0", "1", "2")]
    assert [c[0] for c in epochs[2]] == ["2", "1,200", "0.9000", "0.7200", "0.4500", "0.7200"]
    only_train = Page(write_report(tmp_path / "train", "day", {}, metrics, curves, None,
                                   history=history(validation=False))[0].read_text())
    assert "Training and validation loss" in only_train.h2 and not [r for r in only_train.rows if r[1][0][0] == "epoch"]
    for none in (None, {}, {"train": [], "validation": []}):
        assert loss_figure(none) is None
        html_path, json_path = write_report(tmp_path / "without", "day", {}, metrics, curves, None, history=none)
        page = Page(html_path.read_text())
        assert "Training and validation loss" not in page.h2 and len(page.imgs) == 3
        assert strict(json_path)["history"] is None


def test_undefined_figures_are_dashes_and_null(tmp_path):
    pred = day(1.0, 1, n=2000, buy_rate=0.0)                                # no purchase at all
    metrics, curves = task_metrics(pred, SPEC), task_curves(pred, SPEC)
    assert np.isnan(metrics["purchase"]["auc"]) and np.isnan(metrics["purchase"]["auc_lo"])
    html_path, json_path = write_report(tmp_path, "day", {}, metrics, curves, None, metrics, curves)
    saved = strict(json_path)
    assert saved["tasks"]["purchase"]["auc"] is None and saved["tasks"]["purchase"]["auc_hi"] is None
    rows = Page(html_path.read_text()).table_of("purchase")
    assert rows["model"]["AUC"][0] == "–" and rows["delta"]["AUC"] == ("–", "")


def test_champion_comparison_rerenders_the_report_and_keeps_one_gate_section(pair, tmp_path):
    (m, c, good), (bm, bc, bad) = pair["good"], pair["bad"]
    hist = history()
    write_report(tmp_path, "ranker: trained on ..", {"date": "2026-11-04"}, m, c, {"click_through": [0.4, 0.6]},
                 history=hist)
    gate = compare(binary_sets(good, SPEC), binary_sets(bad, SPEC), PromoteConfig())
    payload = {"date": "2026-11-04", "challenger_version": "2", "champion_version": "1", **gate.to_dict()}
    files = compare_report(tmp_path, m, c, bm, bc, ("challenger v2", "champion v1"), payload,
                           {"baseline": "champion v1, same rows"})
    assert sorted(f.name for f in files) == ["gate.json", "metrics.json", "report.html"]
    text = (tmp_path / "report.html").read_text()
    page = Page(text)
    rows = page.table_of("click_through")
    assert rows["base"]["task"][0] == "champion v1" and rows["delta"]["AUC"][1] == "better"
    assert text.count(GATE_START) == 1 and "Promotion gate: promoted to champion" in text
    assert "<title>ranker: trained on ..</title>" in text and "Training and validation loss" in page.h2
    assert "Expert utilisation" in page.h2 and len(page.imgs) == 5
    saved = strict(tmp_path / "metrics.json")
    assert saved["baseline"]["click_through"]["auc"] == bm["click_through"]["auc"]
    assert saved["meta"] == {"date": "2026-11-04", "baseline": "champion v1, same rows"}
    assert saved["history"] == hist and saved["labels"] == ["challenger v2", "champion v1"]
    assert strict(tmp_path / "gate.json")["promoted"] is True
    # a rerun (or a later add_gate) replaces the gate section, never adds a second one
    compare_report(tmp_path, m, c, bm, bc, ("challenger v2", "champion v1"), payload)
    add_gate(tmp_path, {**payload, "promoted": False, "reason": "again"})
    text = (tmp_path / "report.html").read_text()
    assert text.count(GATE_START) == 1 and "Promotion gate: not promoted" in text and "champion v1" in text
    # a report written before metrics.json carried its title: the gate section is added, nothing else
    legacy = tmp_path / "legacy"
    write_report(legacy, "old", {}, m, c, None)
    (legacy / "metrics.json").write_text(json.dumps({"tasks": {}}))
    compare_report(legacy, m, c, bm, bc, ("challenger v2", "champion v1"), payload)
    text = (legacy / "report.html").read_text()
    assert text.count(GATE_START) == 1 and "champion v1</td>" not in text


@pytest.mark.slow
def test_evaluate_cli_draws_the_baseline(ranker, tmp_path):
    """`mtrank evaluate --baseline` (the ranker's model against itself): the baseline's rows, CIs
    and curves reach the page; the ROC image differs from the one without a baseline."""
    model = ranker / "work" / "runs" / "ranker" / RANKER_DATE / "model"
    pages = {}
    for name, extra in (("alone", []), ("base", ["--baseline", str(model)])):
        r = subprocess.run([*MTRANK, "evaluate", "--model", model, "--data", ranker / "logs", "--date", RANKER_DATE,
                            "--out", tmp_path / name, "--max-rows", "5000", *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        pages[name] = Page((tmp_path / name / "report.html").read_text())
    saved = strict(tmp_path / "base" / "metrics.json")
    ctr, base = saved["tasks"]["ctr"], saved["baseline"]["ctr"]
    assert ctr["auc_lo"] < ctr["auc"] < ctr["auc_hi"] and base["auc_lo"] == ctr["auc_lo"]
    rows = pages["base"].table_of("ctr")
    assert rows["base"]["AUC"] == rows["model"]["AUC"] and rows["delta"]["AUC"] == ("+0.0000", "")
    assert pages["alone"].imgs[0] != pages["base"].imgs[0]                 # ROC: the baseline is drawn
    assert pages["alone"].imgs[2] == pages["base"].imgs[2]                 # histograms: the model's own
