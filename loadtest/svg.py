"""Just enough SVG plotting for the HTML report: axes with nice ticks (linear,
percentile or logarithmic), lines, points, bars, threshold lines and a
stacked bar; every drawn value has an SVG <title>, which browsers show on
hover. Output is a string; no JavaScript, no fonts or files fetched, so a
report opens anywhere offline."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(start + len(ticks) * step, 10))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k ticks from the largest at or below lo to the first at or
    above hi (lo > 0)."""
    k = math.floor(math.log10(lo))
    steps = [m * 10.0 ** e for e in range(k, k + 40) for m in (1, 2, 5)]
    start = max(i for i, v in enumerate(steps) if v <= lo * 1.0001) if steps[0] <= lo * 1.0001 else 0
    ticks = []
    for v in steps[start:]:
        ticks.append(float(f"{v:.12g}"))
        if v >= hi:
            break
    return ticks if len(ticks) > 1 else [*ticks, ticks[-1] * 2]


def spans_decades(values: Sequence[float], ratio: float = 30.0) -> bool:
    """Whether positive values spread over more than `ratio` (a log axis then
    shows every point instead of flattening the small ones)."""
    pos = [v for v in values if v > 0]
    return bool(pos) and max(pos) / min(pos) > ratio


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


class Chart:
    """An x/y chart. `percentile_x=True` makes x a percentile axis: position
    log10(1 / (1 - p/100)), the HdrHistogram view that spreads the tail."""

    def __init__(self, ident: str, title: str, x_label: str, y_label: str, xs: Sequence[float],
                 ys: Sequence[float], width: int = 760, height: int = 300, percentile_x: bool = False,
                 y_min: float | None = 0.0, log_y: bool = False) -> None:
        self.ident, self.title = ident, title
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 64, 150, 28, 44
        self.percentile_x = percentile_x
        self.parts: list[str] = []
        self.legend: list[tuple[str, str]] = []
        xv = [self._xpos(x) for x in xs] or [0.0, 1.0]
        yv = list(ys) or [0.0, 1.0]
        x_lo, x_hi = min(xv), max(xv)
        if percentile_x:
            x_lo, x_hi = 0.0, max(4.0, x_hi)
        self.log_y = log_y and any(y > 0 for y in yv)
        if self.log_y:
            pos = [y for y in yv if y > 0]
            self.yticks = log_ticks(min(pos), max(pos))
        else:
            y_lo = min(yv) if y_min is None else min(y_min, min(yv))
            y_hi = max(yv)
            if y_hi <= y_lo:
                y_hi = y_lo + 1.0
            self.yticks = nice_ticks(y_lo, y_hi)
        self.y_lo, self.y_hi = self.yticks[0], self.yticks[-1]
        if percentile_x:
            self.xticks = [0.0, 1.0, 2.0, 3.0, 4.0] + ([5.0] if x_hi > 4.0 else [])
            self.x_lo, self.x_hi = 0.0, self.xticks[-1]
        else:
            if x_hi <= x_lo:
                x_hi = x_lo + 1.0
            self.xticks = nice_ticks(x_lo, x_hi)
            self.x_lo, self.x_hi = self.xticks[0], self.xticks[-1]
        self.x_label, self.y_label = x_label, y_label

    def _xpos(self, x: float) -> float:
        if self.percentile_x:
            p = min(x, 99.999)
            return math.log10(1 / (1 - p / 100))
        return x

    def px(self, x: float) -> float:
        span = self.x_hi - self.x_lo or 1.0
        return self.left + (self._xpos(x) - self.x_lo) / span * (self.w - self.left - self.right)

    def _ypos(self, y: float) -> float:
        return math.log10(max(y, 1e-12)) if self.log_y else y

    def py(self, y: float) -> float:
        lo, hi = self._ypos(self.y_lo), self._ypos(self.y_hi)
        v = min(max(self._ypos(y), lo), hi)
        return self.h - self.bottom - (v - lo) / ((hi - lo) or 1.0) * (self.h - self.top - self.bottom)

    def _tip(self, x: float, y: float, name: str) -> str:
        xs = f"p{x:g}" if self.percentile_x else fmt(x)
        return f"<title>{escape(name)}: {fmt(y)} at {xs}</title>"

    def line(self, points: Sequence[tuple[float, float]], name: str, color: str, width: float = 1.6,
             dots: bool = False) -> None:
        if not points:
            return
        path = " ".join(f"{self.px(x):.1f},{self.py(y):.1f}" for x, y in points)
        self.parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{path}"/>')
        # Dots to see, or invisible targets to hover: every vertex has its value.
        fill, r = (color, 3) if dots else ("transparent", 4)
        self.parts.append(f'<g fill="{fill}">' + "".join(
            f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="{r}">{self._tip(x, y, name)}</circle>'
            for x, y in points) + "</g>")
        self.legend.append((name, color))

    def hline(self, y: float, name: str, color: str = "#b00020") -> None:
        """A dashed threshold line across the plot (an SLO)."""
        py = self.py(y)
        self.parts.append(f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{py:.1f}" y2="{py:.1f}" '
                          f'stroke="{color}" stroke-width="1.4" stroke-dasharray="6 4"><title>{escape(name)}'
                          f'</title></line>')
        self.legend.append((name, color))

    def points(self, points: Sequence[tuple[float, float]], name: str, color: str, r: float = 1.3) -> None:
        if not points:
            return
        self.parts.append(f'<g fill="{color}" fill-opacity="0.7">' + "".join(
            f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="{r}">{self._tip(x, y, name)}</circle>'
            for x, y in points) + "</g>")
        self.legend.append((name, color))

    def bars(self, edges: Sequence[float], counts: Sequence[float], name: str, color: str) -> None:
        out = []
        base = self.py(self.y_lo)
        for (a, b), c in zip(zip(edges, edges[1:], strict=False), counts, strict=False):
            if c <= 0:
                continue
            x0, x1, y = self.px(a), self.px(b), self.py(c)
            out.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 0.5):.1f}" '
                       f'height="{base - y:.1f}"><title>{fmt(a)}-{fmt(b)}: {fmt(c)} {escape(name)}</title></rect>')
        self.parts.append(f'<g fill="{color}">' + "".join(out) + "</g>")
        self.legend.append((name, color))

    def label(self, x: float, y: float, text: str, color: str = "#333") -> None:
        self.parts.append(f'<text x="{self.px(x) + 5:.1f}" y="{self.py(y) - 5:.1f}" fill="{color}" '
                          f'font-size="11">{escape(text)}</text>')

    def render(self) -> str:
        w, h, lm, r, t, b = self.w, self.h, self.left, self.right, self.top, self.bottom
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{escape(self.ident)}" '
               f'viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" font-family="sans-serif" '
               f'font-size="11"><title>{escape(self.title)}</title>',
               f'<text x="{lm}" y="16" font-size="13" font-weight="bold">{escape(self.title)}</text>']
        for y in self.yticks:
            py = self.py(y)
            out.append(f'<line x1="{lm}" x2="{w - r}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e4e4e4"/>'
                       f'<text x="{lm - 6}" y="{py + 4:.1f}" text-anchor="end">{fmt(y)}</text>')
        if self.log_y:
            out.append(f'<text x="{lm + 4}" y="{t - 4}" fill="#666">log scale</text>')
        for x in self.xticks:
            px = self.left + (x - self.x_lo) / ((self.x_hi - self.x_lo) or 1) * (w - lm - r)
            text = (f"{100 - 100 / 10 ** x:.{max(0, int(x) - 2)}f}" if self.percentile_x else fmt(x))
            out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{t}" y2="{h - b}" stroke="#f0f0f0"/>'
                       f'<text x="{px:.1f}" y="{h - b + 15}" text-anchor="middle">{text}</text>')
        out.append(f'<line x1="{lm}" x2="{w - r}" y1="{h - b}" y2="{h - b}" stroke="#888"/>'
                   f'<line x1="{lm}" x2="{lm}" y1="{t}" y2="{h - b}" stroke="#888"/>')
        out.append(f'<text x="{(lm + w - r) / 2:.0f}" y="{h - 8}" text-anchor="middle">{escape(self.x_label)}</text>')
        out.append(f'<text transform="translate(14,{(t + h - b) / 2:.0f}) rotate(-90)" text-anchor="middle">'
                   f'{escape(self.y_label)}</text>')
        out.extend(self.parts)
        for i, (name, color) in enumerate(self.legend):
            y = t + 10 + i * 16
            out.append(f'<rect x="{w - r + 12}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
                       f'<text x="{w - r + 27}" y="{y + 1}">{escape(name)}</text>')
        out.append("</svg>")
        return "".join(out)


def stacked_bar(ident: str, title: str, segments: Sequence[tuple[str, float]], unit: str = "ms",
                width: int = 760) -> str:
    """One horizontal bar split into named segments (negative ones drawn as 0)."""
    left, right, bar_y, bar_h = 20, 20, 34, 34
    total = sum(max(0.0, v) for _, v in segments) or 1.0
    scale = (width - left - right) / total
    rows = (len(segments) + 2) // 3
    height = bar_y + bar_h + 20 + rows * 18
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{escape(ident)}" viewBox="0 0 {width} '
           f'{height}" width="{width}" height="{height}" role="img" font-family="sans-serif" font-size="11">'
           f'<title>{escape(title)}</title><text x="{left}" y="16" font-size="13" font-weight="bold">'
           f'{escape(title)}</text>']
    x = float(left)
    color: Callable[[int], str] = lambda i: PALETTE[i % len(PALETTE)]  # noqa: E731
    for i, (name, v) in enumerate(segments):
        w = max(0.0, v) * scale
        out.append(f'<rect x="{x:.1f}" y="{bar_y}" width="{w:.1f}" height="{bar_h}" fill="{color(i)}">'
                   f'<title>{escape(name)}: {v:.3f} {unit}</title></rect>')
        if w > 40:
            out.append(f'<text x="{x + w / 2:.1f}" y="{bar_y + bar_h / 2 + 4}" text-anchor="middle" fill="#fff">'
                       f'{fmt(v)}</text>')
        x += w
    for i, (name, v) in enumerate(segments):
        col, row = i % 3, i // 3
        lx, ly = left + col * ((width - left - right) / 3), bar_y + bar_h + 22 + row * 18
        out.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="10" height="10" fill="{color(i)}"/>'
                   f'<text x="{lx + 15:.1f}" y="{ly}">{escape(name)} {v:.3f} {unit}</text>')
    out.append("</svg>")
    return "".join(out)
