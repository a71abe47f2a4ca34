"""The offline report on real metrics: two models' predictions of one synthetic day go through the
real `task_metrics` / `task_curves` (a spec whose task names are nobody's default), and the
written HTML / metrics.json are read back: AUC intervals, the baseline in the plots, coloured
deltas, one histogram panel per task, the loss curves, the champion comparison with its gate.
The plots are inline SVG, read back as XML: panels, legends, curves and their points."""
import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from mtrank.jobs.config import PromoteConfig
from mtrank.jobs.promote import compare
from mtrank.jobs.report import (GATE_START, add_gate, compare_report, delta_class, gates_figure, histogram_figure,
                                loss_figure, reliability_figure, roc_figure, write_report)
from mtrank.pipeline.evaluate import Predictions, binary_sets, task_curves, task_metrics
from tests.conftest import RANKER_DATE, mtrank_in_process, other_names_spec

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
    """Tables as rows of (class, [(cell text, cell class)]), headers as lists; h2 titles; the figures'
    inline <svg> elements (each one inside a <figure>), and any <img> (there should be none)."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.imgs, self.h2, self._row, self._cell, self._h2 = [], [], [], None, None, False
        self.figures = 0
        self.svgs = re.findall(r"<figure><svg\b.*?</svg></figure>", text, re.S)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self._row = (a.get("class", ""), [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", a.get("class", "")]
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "figure":
            self.figures += 1
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


def test_auc_and_pcoc_intervals_bracket_their_figures_in_the_table_and_metrics_json(pair, tmp_path):
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
        # PCOC with the day's noise around it: the interval holds the figure, wider on rarer positives
        assert m["pcoc_lo"] < m["pcoc"] < m["pcoc_hi"], (n, m)
        assert page.table_of(n)["model"]["PCOC"][0] == f"{m['pcoc']:.3f} [{m['pcoc_lo']:.3f}, {m['pcoc_hi']:.3f}]"
    assert (metrics["click_through"]["pcoc_hi"] - metrics["click_through"]["pcoc_lo"]
            < metrics["purchase"]["pcoc_hi"] - metrics["purchase"]["pcoc_lo"])
    assert "auc_lo" not in metrics["watch_time"] and "pcoc_lo" not in metrics["watch_time"]


SVG = "{http://www.w3.org/2000/svg}"


def panels(markup: str) -> list[ET.Element]:
    """A figure's panels, in order; the markup must parse as XML and be a labelled image."""
    root = ET.fromstring(markup)
    assert root.tag == SVG + "svg" and root.get("role") == "img" and root.get("aria-label")
    assert len(root.get("viewBox").split()) == 4
    return [g for g in root.iter(SVG + "g") if g.get("class") == "panel"]


def title(panel) -> str:
    return next(t.text for t in panel.iter(SVG + "text") if t.get("class") == "title")


def legend(panel) -> list[str]:
    return [t.text for g in panel.iter(SVG + "g") if g.get("class") == "legend" for t in g.iter(SVG + "text")]


def curves_of(panel) -> list[str]:
    """The classes of the curves drawn in a panel, in drawing order."""
    return [g.get("class") for g in panel.findall(SVG + "g") if g.get("class") != "legend"]


def line(panel, cls: str) -> list[tuple[float, float]]:
    """The pixel points of a panel's curve (its polyline)."""
    (poly,) = panel.find(f"{SVG}g[@class='{cls}']").findall(SVG + "polyline")
    return [tuple(map(float, p.split(","))) for p in poly.get("points").split()]


def markers(panel, cls: str) -> list[ET.Element]:
    return [e for e in panel.find(f"{SVG}g[@class='{cls}']") if e.tag != SVG + "polyline"]


def frame(panel) -> tuple[float, float, float, float]:
    """The plot area (left, top, width, height): the panel's first rect."""
    r = panel.find(SVG + "rect")
    return tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))


def proportional(pixels, values, tol: float = 0.25) -> bool:
    """Pixels an increasing affine map of the values (to the markup's 0.1 px rounding)."""
    scale = (pixels[-1] - pixels[0]) / (values[-1] - values[0])
    return scale > 0 and all(abs(p - pixels[0] - (v - values[0]) * scale) <= tol for p, v in zip(pixels, values))


def test_baseline_is_drawn_in_every_roc_and_reliability_panel(pair):
    (m, c, _), (bm, bc, _) = pair["good"], pair["bad"]
    labels = ("challenger v2", "champion v1")
    roc = panels(roc_figure(c, bc, m, bm, labels))
    assert [title(p) for p in roc] == list(c)                           # one panel per figure
    for p, name in zip(roc, c):
        assert legend(p) == [f"challenger v2 (AUC {m[name]['auc']:.4f})", f"champion v1 (AUC {bm[name]['auc']:.4f})"]
        assert curves_of(p) == ["reference", "model", "baseline"]        # chance diagonal, model, champion
        left, top, w, h = frame(p)                                      # ROC axes: [0, 1] on both
        fpr, tpr = bc[name]["roc"]["fpr"], bc[name]["roc"]["tpr"]
        drawn = [v for xy in line(p, "baseline") for v in xy]
        assert drawn == pytest.approx([v for x, y in zip(fpr, tpr) for v in (left + x * w, top + (1 - y) * h)],
                                      abs=0.051)
    for p, name in zip(panels(reliability_figure(c, bc, labels)), c):
        assert legend(p) == list(labels) and curves_of(p) == ["reference", "model", "baseline"]
        xs = [x for x, _ in line(p, "baseline")]
        assert proportional(xs, bc[name]["calibration"]["mean_pred"])
        assert len(markers(p, "baseline")) == len(xs) == len(bc[name]["calibration"]["mean_pred"])
    # a calibrated model also shows its curve before the Platt layer
    calibrated = {name: {**v, "calibration_uncalibrated": bc[name]["calibration"]} for name, v in c.items()}
    for p, name in zip(panels(reliability_figure(calibrated)), c):
        assert legend(p) == ["model", "model before calibration"] and curves_of(p) == ["reference", "model", "raw"]
        assert proportional([x for x, _ in line(p, "raw")], bc[name]["calibration"]["mean_pred"])
    for p, name in zip(panels(reliability_figure(c)), c):                # one curve: no legend needed
        assert legend(p) == [] and curves_of(p) == ["reference", "model"]
    alone = panels(roc_figure(c))                                       # no baseline: the model alone
    assert all(curves_of(p) == ["reference", "model"] and len(legend(p)) == 1 for p in alone)


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
        markup = histogram_figure(cur)
        drawn = panels(markup)
        assert [title(p) for p in drawn] == list(cur)
        offsets = [re.findall(r"[\d.]+", p.get("transform")) for p in drawn]
        assert len({y for _, y in offsets}) == (len(cur) + 3) // 4          # rows of at most 4 panels
        p, name = drawn[1], list(curves)[1]
        pos = metrics[name]["positives"]
        assert legend(p) == [f"negatives ({metrics[name]['rows'] - pos:,})", f"positives ({pos:,})"]
        assert curves_of(p) == ["negatives", "positives"] and 'class="baseline"' not in markup
        bins = len(curves[name]["histogram"]["positives"])
        assert len(line(p, "positives")) == 2 * bins + 2                # a step per bin, closed down to 0


def test_loss_section_is_there_iff_a_history_is(pair, tmp_path):
    metrics, curves, _ = pair["good"]
    hist = history()
    drawn = panels(loss_figure(hist))
    assert [title(p) for p in drawn] == TASKS                              # one per task, names as given
    assert curves_of(drawn[0]) == ["train", "epoch-end"]
    train = line(drawn[0], "train")
    assert proportional([x for x, _ in train], [e["step"] for e in hist["train"]])
    tops = [tuple(map(float, e.get("points").split()[0].split(","))) for e in markers(drawn[0], "epoch-end")]
    assert not drawn[0].find(f"{SVG}g[@class='epoch-end']").findall(SVG + "polyline")   # markers, no line
    steps = [e["step"] for e in hist["train"]]                             # the diamonds at the epoch ends' steps
    assert [x for x, _ in tops] == pytest.approx([train[steps.index(s)][0] for s in (400, 800, 1200)], abs=0.051)
    assert len({y for _, y in tops}) == 1                                  # the same loss, 0.9, at each
    assert legend(drawn[0]) == ["train (running mean)", "validation"]
    assert curves_of(drawn[2]) == ["train"] and legend(drawn[2]) == ["train (running mean)"]   # no validation for "x"
    html_path, json_path = write_report(tmp_path / "with", "day", {}, metrics, curves, None, history=hist)
    page = Page(html_path.read_text())
    assert "Training and validation loss" in page.h2 and len(page.svgs) == page.figures == 4 and not page.imgs
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
        assert "Training and validation loss" not in page.h2 and len(page.svgs) == page.figures == 3
        assert strict(json_path)["history"] is None


def test_figures_skip_non_finite_points_escape_names_and_draw_empty_panels():
    """Task names are data (`<`, `&`), a curve may carry NaN / inf / None, a task may have no positives:
    the markup still parses, no non-finite number reaches it, the empty task gets an empty panel."""
    roc = {"fpr": [0.0, 0.2, float("inf"), 0.6, 1.0], "tpr": [0.0, 0.5, 0.7, None, 1.0]}
    cal = {"mean_pred": [0.1, float("nan"), 0.5], "observed": [0.1, 0.3, 0.4]}
    hist = {"edges": [0.0, 0.5, 1.0], "counts": [3, 1], "positives": [0, 0], "negatives": [3, 1]}
    curves = {"a<b&c": {"roc": roc, "calibration": cal, "histogram": hist},
              "empty": {"roc": {"fpr": [], "tpr": []}, "calibration": {"mean_pred": [], "observed": []},
                        "histogram": {"edges": [], "counts": [], "positives": [], "negatives": []}}}
    hist_nan = {"train": [{"step": 1, "loss": {"a<b&c": float("nan")}}, {"step": 2, "loss": {"a<b&c": 0.5}},
                          {"step": 3, "loss": {"a<b&c": 0.4}}], "validation": []}
    figures = [roc_figure(curves, metrics={"a<b&c": {"auc": float("nan")}}), reliability_figure(curves, curves),
               histogram_figure(curves), loss_figure(hist_nan),
               gates_figure({"a<b&c": [0.25, float("nan"), 0.75], "d": [1.0, 0.0, 0.0]})]
    for markup in figures:
        assert "a&lt;b&amp;c" in markup and "a<b&c" not in markup
        root = ET.fromstring(markup)
        numbers = [float(v) for e in root.iter() for k in ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "width")
                   if e.get(k) is not None for v in [e.get(k)]]
        numbers += [float(v) for e in root.iter() for v in re.split("[ ,]", e.get("points") or "") if v]
        assert numbers and all(math.isfinite(v) for v in numbers)
        assert "a<b&c" in [t.text for t in root.iter(SVG + "text")]
    roc_panels = panels(figures[0])
    assert [title(p) for p in roc_panels] == ["a<b&c", "empty"]
    assert len(line(roc_panels[0], "model")) == 3                          # the inf and the None point skipped
    assert legend(roc_panels[0]) == ["model"]                              # no AUC: no number in the legend
    assert curves_of(roc_panels[1]) == ["reference"] and legend(roc_panels[1]) == []   # empty, not an error
    rel = panels(figures[1])
    assert len(line(rel[0], "model")) == 2 and curves_of(rel[1]) == ["reference"]
    hist_panels = panels(figures[2])
    assert curves_of(hist_panels[0]) == ["negatives"] and curves_of(hist_panels[1]) == []   # no positives
    assert len(line(panels(figures[3])[0], "train")) == 2
    cells = [t.text for t in ET.fromstring(figures[4]).iter(SVG + "text")]
    assert {"0.25", "–", "0.75", "1.00", "0.00"} <= set(cells)


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
    assert "Expert utilisation" in page.h2 and len(page.svgs) == page.figures == 5 and not page.imgs
    cells = [t.text for t in ET.fromstring(page.svgs[4]).iter(SVG + "text")]
    assert "0.40" in cells and "0.60" in cells and "click_through" in cells and "e1" in cells
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
    and curves reach the page; the ROC figure draws it, the histograms stay the model's own."""
    model = ranker / "work" / "runs" / "ranker" / RANKER_DATE / "model"
    pages = {}
    for name, extra in (("alone", []), ("base", ["--baseline", str(model)])):
        r = mtrank_in_process("evaluate", "--model", model, "--data", ranker / "logs", "--date", RANKER_DATE,
                              "--out", tmp_path / name, "--max-rows", "5000", *extra)
        assert r.returncode == 0, r.stderr
        pages[name] = Page((tmp_path / name / "report.html").read_text())
    saved = strict(tmp_path / "base" / "metrics.json")
    ctr, base = saved["tasks"]["ctr"], saved["baseline"]["ctr"]
    assert ctr["auc_lo"] < ctr["auc"] < ctr["auc_hi"] and base["auc_lo"] == ctr["auc_lo"]
    rows = pages["base"].table_of("ctr")
    assert rows["base"]["AUC"] == rows["model"]["AUC"] and rows["delta"]["AUC"] == ("+0.0000", "")
    roc = [pages[k].svgs[0] for k in ("alone", "base")]
    assert 'class="baseline"' in roc[1] and 'class="baseline"' not in roc[0]   # ROC: the baseline is drawn
    assert pages["alone"].svgs[2] == pages["base"].svgs[2]                 # histograms: the model's own
