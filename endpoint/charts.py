"""Charts as inline SVG, drawn by the endpoint itself: no JavaScript, no fonts or files to fetch.

Two kinds: bars (counts per time bin, one or two series side by side) and lines (a gauge over
time, gaps where nothing was sampled), each with marks above the time axis for events (workers
launched and terminated). Values are whatever the caller binned; these functions only draw, and
escape every text they are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 600, 150
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 18, 20  # room for the value axis, the legend and the time axis
COLOURS = ("#2b6cb0", "#dd6b20", "#2f855a", "#c53030")


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per bin, oldest first; None: no sample in that bin


@dataclass(frozen=True)
class Marks:
    name: str
    counts: Sequence[int]  # events per bin
    up: bool  # a triangle pointing up (launches) or down (terminations)


def _scale_max(series: Sequence[Series]) -> float:
    top = max((value for s in series for value in s.values if value is not None), default=0.0)
    if top <= 0:
        return 1.0
    for nice in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10_000, 20_000, 50_000,
                 100_000, 200_000, 500_000, 1_000_000):
        if top <= nice:
            return float(nice)
    return float(top)


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _frame(title: str, series: Sequence[Series], top: float, axis: tuple[str, str], label: str) -> list[str]:
    """The chart's outline: title, legend, value axis and time axis labels."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(label)}">',
             f"<title>{escape(label)}</title>",
             f'<text x="{LEFT}" y="12" class="chart-title">{escape(title)}</text>']
    x = WIDTH - RIGHT
    for index, s in reversed(list(enumerate(series))):
        text = escape(s.name)
        x -= 8 + 7 * len(s.name)
        parts.append(f'<rect x="{x}" y="4" width="8" height="8" fill="{COLOURS[index % len(COLOURS)]}"/>'
                     f'<text x="{x + 11}" y="12" class="legend">{text}</text>')
        x -= 14
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - fraction)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{LEFT - 4}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
                     f"{_number(top * fraction)}</text>")
    parts.append(f'<text x="{LEFT}" y="{HEIGHT - 5}" class="axis">{escape(axis[0])}</text>'
                 f'<text x="{LEFT + plot_w}" y="{HEIGHT - 5}" class="axis" text-anchor="end">{escape(axis[1])}</text>')
    return parts


def bars(title: str, series: Sequence[Series], axis: tuple[str, str], label: str) -> str:
    """Bars per bin, the series side by side within each bin."""
    top = _scale_max(series)
    parts = _frame(title, series, top, axis, label)
    bins = max((len(s.values) for s in series), default=0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(bins, 1)
    width = max(slot * 0.8 / max(len(series), 1), 0.5)
    for index, s in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        for position, value in enumerate(s.values):
            if not value:
                continue
            height = plot_h * value / top
            x = LEFT + position * slot + slot * 0.1 + index * width
            parts.append(f'<rect x="{x:.1f}" y="{TOP + plot_h - height:.1f}" width="{width:.1f}" '
                         f'height="{height:.1f}" fill="{colour}"><title>{escape(s.name)}: {value:g}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def lines(title: str, series: Sequence[Series], axis: tuple[str, str], label: str,
          marks: Sequence[Marks] = ()) -> str:
    """A line per series (broken where a bin has no value), and event marks along the bottom."""
    top = _scale_max(series)
    parts = _frame(title, series, top, axis, label)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    for index, s in enumerate(series):
        slot = plot_w / max(len(s.values), 1)
        runs: list[list[str]] = [[]]
        for position, value in enumerate(s.values):
            if value is None:
                runs.append([])
                continue
            runs[-1].append(f"{LEFT + (position + 0.5) * slot:.1f},{TOP + plot_h * (1 - value / top):.1f}")
        for points in runs:
            if len(points) == 1:
                x, y = points[0].split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="1.5" fill="{COLOURS[index % len(COLOURS)]}"/>')
            elif points:
                parts.append(f'<polyline points="{" ".join(points)}" fill="none" '
                             f'stroke="{COLOURS[index % len(COLOURS)]}" stroke-width="1.5"/>')
    for mark in marks:
        slot = plot_w / max(len(mark.counts), 1)
        y = TOP + plot_h - 1 if mark.up else TOP + plot_h - 9
        colour = "#2f855a" if mark.up else "#c53030"
        for position, events in enumerate(mark.counts):
            if events:
                x = LEFT + (position + 0.5) * slot
                tip = (f"{x - 4:.1f},{y:.1f} {x + 4:.1f},{y:.1f} {x:.1f},{y - 8:.1f}" if mark.up
                       else f"{x - 4:.1f},{y:.1f} {x + 4:.1f},{y:.1f} {x:.1f},{y + 8:.1f}")
                parts.append(f'<polygon points="{tip}" fill="{colour}" class="mark">'
                             f"<title>{escape(mark.name)}: {events}</title></polygon>")
    parts.append("</svg>")
    return "".join(parts)
