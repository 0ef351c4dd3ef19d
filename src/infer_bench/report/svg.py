"""Inline SVG charts for the HTML report: line charts on linear, log or percentile axes, stacked bars.

Pure functions from numbers to markup, deterministic and dependency-free, so a report opens offline
and the same result always renders to the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f6fb4", "#d1452f", "#2f9e44", "#8e5ac8", "#e6891c", "#7d5a45", "#d44a9a", "#5f6b73")
FONT = "font-family='system-ui, sans-serif' font-size='11'"


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    color: str
    dashed: bool = False


@dataclass(frozen=True)
class Axis:
    """A mapping from data to [0, 1] and the ticks to label it with."""

    low: float
    high: float
    ticks: Sequence[tuple[float, str]]
    title: str
    transform: Callable[[float], float] = field(default=lambda v: v)

    def position(self, value: float) -> float:
        low, high = self.transform(self.low), self.transform(self.high)
        return 0.0 if high == low else (self.transform(value) - low) / (high - low)


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``high``: steps of 1, 2 or 5 × 10^k."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def linear_axis(high: float, title: str, unit: str = "") -> Axis:
    ticks = nice_ticks(high)
    return Axis(0.0, ticks[-1], [(t, f"{t:g}{unit}") for t in ticks], title)


def percentile_axis(max_nines: float, title: str = "percentile") -> Axis:
    """HDR style: x = log10(1 / (1 − p)), so 90 %, 99 %, 99.9 % are evenly spaced."""
    nines = max(1, math.ceil(max_nines))
    labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
    ticks = [(float(k), labels[k] if k < len(labels) else f"{k} nines") for k in range(nines + 1)]
    return Axis(0.0, float(nines), ticks, title)


def nines(percentile: float) -> float:
    """The percentile axis coordinate of ``percentile`` (0–100)."""
    return math.log10(1 / max(1e-12, 1 - percentile / 100))


def line_chart(
    series: Sequence[Series],
    x: Axis,
    y: Axis,
    *,
    title: str,
    width: int = 640,
    height: int = 300,
    marks: Sequence[tuple[float, str]] = (),
) -> str:
    """A line chart; ``marks`` are vertical dashed lines at x values with a label (stage boundaries)."""
    left, right, top, bottom = 58, 34, 28, 44
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(value: float) -> float:
        return left + x.position(value) * plot_w

    def py(value: float) -> float:
        return top + (1 - y.position(value)) * plot_h

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
        f"role='img' aria-label='{escape(title)}' {FONT}>",
        f"<text x='{left}' y='16' font-size='13' font-weight='600'>{escape(title)}</text>",
        f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='#fff' stroke='#ccc'/>",
    ]
    for value, label in y.ticks:
        yy = py(value)
        out.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#eee'/>")
        out.append(f"<text x='{left - 6}' y='{yy + 4:.1f}' text-anchor='end' fill='#555'>{escape(label)}</text>")
    for value, label in x.ticks:
        xx = px(value)
        out.append(f"<line x1='{xx:.1f}' x2='{xx:.1f}' y1='{top}' y2='{top + plot_h}' stroke='#eee'/>")
        out.append(
            f"<text x='{xx:.1f}' y='{top + plot_h + 16}' text-anchor='middle' fill='#555'>{escape(label)}</text>"
        )
    for value, label in marks:
        xx = px(value)
        out.append(
            f"<line x1='{xx:.1f}' x2='{xx:.1f}' y1='{top}' y2='{top + plot_h}' stroke='#999' stroke-dasharray='4 3'/>"
        )
        out.append(f"<text x='{xx + 3:.1f}' y='{top + 11}' fill='#777' font-size='10'>{escape(label)}</text>")
    for s in series:
        if not s.points:
            continue
        path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in s.points)
        dash = " stroke-dasharray='5 3'" if s.dashed else ""
        out.append(
            f"<polyline points='{path}' fill='none' stroke='{s.color}' stroke-width='1.8'{dash}>"
            f"<title>{escape(s.name)}</title></polyline>"
        )
    out.append(
        f"<text x='{left + plot_w / 2:.0f}' y='{height - 6}' text-anchor='middle' fill='#333'>{escape(x.title)}</text>"
    )
    out.append(
        f"<text transform='translate(12 {top + plot_h / 2:.0f}) rotate(-90)' text-anchor='middle' fill='#333'>"
        f"{escape(y.title)}</text>"
    )
    legend_x = left + 8
    for index, s in enumerate(series):
        yy = top + 14 + 14 * index
        dash = " stroke-dasharray='5 3'" if s.dashed else ""
        line = f"x1='{legend_x}' x2='{legend_x + 18}' y1='{yy}' y2='{yy}'"
        out.append(f"<line {line} stroke='{s.color}' stroke-width='2'{dash}/>")
        out.append(f"<text x='{legend_x + 24}' y='{yy + 4}' fill='#333'>{escape(s.name)}</text>")
    out.append("</svg>")
    return "".join(out)


def stacked_bars(
    rows: Sequence[tuple[str, Sequence[tuple[str, int]]]], colors: dict[str, str], *, title: str, width: int = 640
) -> str:
    """One horizontal bar per row, split by category counts, with a legend of the categories."""
    left, right, top, bar_h, gap = 120, 16, 28, 22, 10
    plot_w = width - left - right
    categories = [c for c in colors if any(dict(parts).get(c) for _, parts in rows)]
    height = top + len(rows) * (bar_h + gap) + 30
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
        f"role='img' aria-label='{escape(title)}' {FONT}>",
        f"<text x='{left}' y='16' font-size='13' font-weight='600'>{escape(title)}</text>",
    ]
    for index, (label, parts) in enumerate(rows):
        y = top + index * (bar_h + gap)
        total = sum(count for _, count in parts) or 1
        out.append(f"<text x='{left - 6}' y='{y + bar_h / 2 + 4:.0f}' text-anchor='end'>{escape(label)}</text>")
        x = float(left)
        for category, count in parts:
            if not count:
                continue
            w = count / total * plot_w
            out.append(
                f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{bar_h}' fill='{colors.get(category, '#999')}'>"
                f"<title>{escape(category)}: {count:,} ({count / total:.1%})</title></rect>"
            )
            x += w
    legend_y = height - 12
    x = float(left)
    for category in categories:
        out.append(f"<rect x='{x:.0f}' y='{legend_y - 9}' width='10' height='10' fill='{colors[category]}'/>")
        out.append(f"<text x='{x + 14:.0f}' y='{legend_y}'>{escape(category)}</text>")
        x += 24 + 7 * len(category)
    out.append("</svg>")
    return "".join(out)
