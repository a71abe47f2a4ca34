"""Small-multiple line, step and heat-map plots as inline SVG, for the evaluation report.

Hand-written because a plotting library cost seconds per report (import and rasterising) in every
daily run; the report needs only lines, markers, step histograms, boxes, ticks and a legend.
Every text is escaped (task names are user data) and non-finite points are dropped.
"""
from __future__ import annotations

import html
import math


def _finite(v) -> bool:
    """A plottable number: None, strings, NaN and infinities are not."""
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# Colour, stroke width and dash of a curve by its role: matplotlib's C0 / C1 / C3 and grey, so the
# reports read as before. "alt" is a model's second curve (positives, validation).
STYLE = {"reference": ("#000", 0.8, "1.5 2"), "model": ("#1f77b4", 1.4, None), "baseline": ("#ff7f0e", 1.2, "5 3"),
         "raw": ("#8c8c8c", 1.0, "1.5 2"), "alt": ("#d62728", 1.2, None)}
VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]


def viridis(t: float) -> str:
    """Viridis at t in [0, 1], linear between nine samples: perceptually even, readable in grey."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = (tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in VIRIDIS[i:i + 2])
    return "#" + "".join(f"{round(u + (v - u) * (t - i)):02x}" for u, v in zip(a, b))


def _ticks(lo: float, hi: float, fixed: bool = False, n: int = 5) -> tuple[float, float, list]:
    """Round ticks (1, 2, 2.5, 5 × 10^k) over [lo, hi], the limits widened to them unless `fixed`."""
    if not hi - lo > 1e-9 * max(abs(lo), abs(hi)):   # one value: a range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    a, b = lo / step, hi / step
    first, last = (math.ceil(a - 1e-9), math.floor(b + 1e-9)) if fixed else (math.floor(a + 1e-9), math.ceil(b - 1e-9))
    digits = len(f"{step:.12f}".rstrip("0").partition(".")[2])
    fmt = f"{{:,.{digits}f}}" if step >= 1e-6 else "{:.3g}"
    ticks = [(k * step, fmt.format(round(k * step, digits) + 0.0)) for k in range(first, last + 1)]
    return (lo, hi, ticks) if fixed else (first * step, last * step, ticks)


def _stroke(role: str) -> str:
    colour, width, dash = STYLE[role]
    return f'stroke="{colour}" stroke-width="{width}"' + (f' stroke-dasharray="{dash}"' if dash else "")


def _marker(kind: str, x: float, y: float, colour: str) -> str:
    """A point marker centred on (x, y), by matplotlib's letters: o . circles, s square, ^ triangle, D diamond."""
    r = {".": 1.6, "D": 3.2}.get(kind, 2.6)
    if kind in "o.":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}"/>'
    if kind == "s":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{colour}"/>'
    shape = {"^": [(0, -r), (r, r * 0.8), (-r, r * 0.8)], "D": [(0, -r), (r * 0.75, 0), (0, r), (-r * 0.75, 0)]}[kind]
    return f'<polygon points="{" ".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in shape)}" fill="{colour}"/>'


def _text(x: float, y: float, text: str, size: float = 9, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f"{html.escape(str(text))}</text>")


class Panel:
    """One panel of a figure, drawn as SVG: marks are collected in data units and placed when drawn,
    once all of them have set the axes' limits (widened to round ticks unless given). Non-finite
    points are dropped, so a NaN never reaches the markup; a panel without data is an empty frame."""
    TOP, RIGHT, BOTTOM = 22, 16, 36

    def __init__(self, title: str, xlabel: str = "", ylabel: str = "", xlim=None, ylim=None, xticks=None,
                 yticks=None, legend: str = "best", size: tuple[int, int] = (220, 170)):
        self.title, self.xlabel, self.ylabel, self.legend, self.size = title, xlabel, ylabel, legend, size
        self.lim, self.given_ticks = (xlim, ylim), (xticks, yticks)   # ticks: [(value, label)] for categories
        self.curves: list[tuple] = []   # (class, role, points, marker, join, legend label)
        self.boxes: list[tuple] = []    # (x0, y0, x1, y1, fill, text, text colour)

    def line(self, xs, ys, role: str = "model", label: str | None = None, marker: str | None = None,
             join: bool = True, cls: str | None = None) -> None:
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if _finite(x) and _finite(y)]
        if pts:
            self.curves.append((cls or role, role, pts, marker, join, label))

    def stairs(self, values, edges, role: str, label: str | None = None, cls: str | None = None) -> None:
        """A step histogram: each bin's top, closed down to 0 at both ends."""
        bins = list(zip(edges, edges[1:], values))
        if bins:
            self.line([bins[0][0], *(x for a, b, _ in bins for x in (a, b)), bins[-1][1]],
                      [0.0, *(v for *_, v in bins for _ in "ab"), 0.0], role, label, cls=cls)

    def box(self, x0, y0, x1, y1, fill: str, text: str = "", ink: str = "#000") -> None:
        self.boxes.append((x0, y0, x1, y1, fill, text, ink))

    def _axis(self, k: int) -> tuple[float, float, list]:
        if self.given_ticks[k] is not None:
            return (*self.lim[k], self.given_ticks[k])
        if self.lim[k]:
            return _ticks(*self.lim[k], fixed=True)
        vals = [p[k] for c in self.curves for p in c[2]] + [b[k + d] for b in self.boxes for d in (0, 2)]
        return _ticks(min(vals), max(vals)) if vals else _ticks(0.0, 1.0)

    def draw(self) -> tuple[float, float, str]:
        """(width, height, SVG markup with the panel's top left at 0, 0)."""
        (x0, x1, xt), (y0, y1, yt) = self._axis(0), self._axis(1)
        w, h, top = *self.size, self.TOP
        left = (16 if self.ylabel else 4) + 5.2 * max((len(t) for _, t in yt), default=0) + 6
        X = lambda x: min(max(left + (x - x0) / (x1 - x0) * w, left), left + w)  # noqa: E731
        Y = lambda y: min(max(top + (y1 - y) / (y1 - y0) * h, top), top + h)      # noqa: E731
        out = [f'<rect x="{left:.1f}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
        for v, t in xt:
            out += [f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{top}" y2="{top + h}" stroke="#eee"/>',
                    _text(X(v), top + h + 11, t, 8)]
        for v, t in yt:
            out += [f'<line x1="{left:.1f}" x2="{left + w:.1f}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#eee"/>',
                    _text(left - 3, Y(v) + 3, t, 8, "end")]
        if self.title:
            out.append(_text(left + w / 2, top - 7, self.title, 10.5, extra=' class="title" font-weight="600"'))
        out += [_text(left + w / 2, top + h + 28, self.xlabel, 9)] if self.xlabel else []
        out += [_text(10, top + h / 2, self.ylabel, 9, extra=f' transform="rotate(-90 10 {top + h / 2:.1f})"')
                ] if self.ylabel else []
        for bx0, by0, bx1, by1, fill, text, ink in self.boxes:
            out.append(f'<rect x="{min(X(bx0), X(bx1)):.1f}" y="{min(Y(by0), Y(by1)):.1f}" '
                       f'width="{abs(X(bx1) - X(bx0)):.1f}" height="{abs(Y(by1) - Y(by0)):.1f}" fill="{fill}"/>')
            if text:
                out.append(_text((X(bx0) + X(bx1)) / 2, (Y(by0) + Y(by1)) / 2 + 3, text, 8, extra=f' fill="{ink}"'))
        placed = [[(X(x), Y(y)) for x, y in c[2]] for c in self.curves]
        for (cls, role, _, marker, join, _), xy in zip(self.curves, placed):
            g = [f'<g class="{html.escape(cls)}">']
            if join and len(xy) > 1:
                points = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
                g.append(f'<polyline points="{points}" fill="none" {_stroke(role)}/>')
            g += [_marker(marker, x, y, STYLE[role][0]) for x, y in xy] if marker else []
            out.append("".join(g) + "</g>")
        out.append(self._legend(left, w, h, [p for xy in placed for p in xy]))
        return left + w + self.RIGHT, top + h + self.BOTTOM, "".join(out)

    def _legend(self, left: float, w: float, h: float, points: list) -> str:
        """The curves' names in a corner: the one given, or ("best") the one covering fewest points."""
        entries = [c for c in self.curves if c[5]]
        if not entries:
            return ""
        lw, lh = min(30 + 4.8 * max(len(c[5]) for c in entries), w - 8), 12 * len(entries) + 4
        corners = {f"{v} {u}": (left + 4 if u == "left" else left + w - lw - 4,
                                self.TOP + 4 if v == "upper" else self.TOP + h - lh - 4)
                   for v in ("upper", "lower") for u in ("right", "left")}
        x, y = corners.get(self.legend) or min(corners.values(), key=lambda c: sum(
            c[0] <= px <= c[0] + lw and c[1] <= py <= c[1] + lh for px, py in points))
        out = [f'<g class="legend"><rect x="{x:.1f}" y="{y:.1f}" width="{lw:.1f}" height="{lh}" fill="#fff" '
               f'fill-opacity="0.85" stroke="#ccc"/>']
        for i, (_, role, _, marker, join, label) in enumerate(entries):
            yy = y + 8 + 12 * i
            if join:
                out.append(f'<line x1="{x + 4:.1f}" x2="{x + 22:.1f}" y1="{yy:.1f}" y2="{yy:.1f}" {_stroke(role)}/>')
            out += [_marker(marker, x + 13, yy, STYLE[role][0])] if marker else []
            out.append(_text(x + 26, yy + 3, label, 8, "start"))
        return "".join(out) + "</g>"


def figure(title: str, panels: list[Panel], cols: int = 4) -> str:
    """Panels row by row under one title, as one inline <svg> (small multiples: one panel per
    task, so no task's curve hides another's)."""
    drawn = [p.draw() for p in panels]
    cols = max(1, min(cols, len(drawn)))
    widths = [max(d[0] for d in drawn[c::cols]) for c in range(cols)] if drawn else [300]
    body, y = [], 30.0
    for r in range(0, len(drawn), cols):
        x = 0.0
        for (_, _, markup), cw in zip(drawn[r:r + cols], widths):
            body.append(f'<g class="panel" transform="translate({x:.1f},{y:.1f})">{markup}</g>')
            x += cw
        y += max(d[1] for d in drawn[r:r + cols])
    width, t = max(sum(widths), 8 * len(title)), html.escape(title)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {y + 4:.0f}" width="{width:.0f}" '
            f'role="img" aria-label="{t}" font-family="system-ui,sans-serif"><title>{t}</title>'
            + _text(width / 2, 18, title, 13, extra=' font-weight="600"') + "".join(body) + "</svg>")
