"""Charts as inline SVG: the geometry of a stacked bar chart, computed here, drawn by a template.

Nothing is drawn in the browser and nothing is fetched: the spend page's template writes the
rectangles this module lays out. Series beyond :data:`MAX_SERIES` are folded into "other" so a
tenant with forty campaigns still gets a chart one can read; the table beside it lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SERIES = 6
OTHER = "other"
WIDTH, HEIGHT = 720, 220
PAD_LEFT, PAD_RIGHT, PAD_BOTTOM, PAD_TOP = 56, 24, 28, 12


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int  # which colour
    label: str  # what a pointer or a screen reader is told


@dataclass
class Chart:
    width: int
    height: int
    bars: list[Bar] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)  # (y, text) of the value axis
    days: list[tuple[float, str]] = field(default_factory=list)  # (x, text) of the day axis
    legend: list[tuple[int, str, float]] = field(default_factory=list)  # (colour, name, total)
    baseline: float = 0.0
    right: float = WIDTH - PAD_RIGHT
    empty: bool = True


def _nice_top(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times 10^k at or above ``value``."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    while magnitude > value:
        magnitude /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def fold(series: dict[str, list[int]], keep: int = MAX_SERIES) -> list[tuple[str, list[int]]]:
    """The ``keep - 1`` largest series by total, and the rest summed as "other"."""
    ranked = sorted(series.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    if len(ranked) <= keep:
        return ranked
    head, tail = ranked[: keep - 1], ranked[keep - 1 :]
    other = [sum(col) for col in zip(*(values for _, values in tail), strict=True)]
    return [*head, (OTHER, other)]


def stacked_bars(
    days: list[str], series: dict[str, list[int]], *, unit: float = 1e9, money: bool = True
) -> Chart:
    """Bars per day, stacked by series (values in nano-USD, shown in USD)."""
    folded = fold(series)
    chart = Chart(WIDTH, HEIGHT, baseline=HEIGHT - PAD_BOTTOM)
    totals = [sum(values[i] for _, values in folded) / unit for i in range(len(days))]
    top = _nice_top(max(totals, default=0.0))
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    slot = (WIDTH - PAD_LEFT - PAD_RIGHT) / max(1, len(days))
    bar_w = max(2.0, slot * 0.7)
    for i, day in enumerate(days):
        x = PAD_LEFT + i * slot + (slot - bar_w) / 2
        y = chart.baseline
        for colour, (name, values) in enumerate(folded):
            value = values[i] / unit
            if value <= 0:
                continue
            h = value / top * plot_h
            y -= h
            shown = f"${value:,.4f}" if money else f"{value:,.0f}"
            chart.bars.append(Bar(x, y, bar_w, h, colour, f"{day} · {name}: {shown}"))
        if i % 7 == len(days) % 7 or i == len(days) - 1:
            chart.days.append((x + bar_w / 2, day[5:]))
    digits = 2 if top >= 1 else 3 if top >= 0.1 else 4
    for k in range(5):
        value = top * k / 4
        text = f"${value:,.{digits}f}" if money else f"{value:,.0f}"
        chart.ticks.append((chart.baseline - plot_h * k / 4, text))
    chart.legend = [(c, name, sum(values) / unit) for c, (name, values) in enumerate(folded)]
    chart.empty = not chart.bars
    return chart
