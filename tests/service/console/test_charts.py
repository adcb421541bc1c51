"""The spend chart's geometry: bars stacked to the right heights, many series folded into "other",
and a value axis with round steps."""

from __future__ import annotations

import pytest

from service.console import charts


def test_bars_stack_to_each_days_total_on_a_round_axis() -> None:
    days = ["2026-11-30", "2026-12-01", "2026-12-02"]
    series = {"spring": [0, 1_500_000_000, 500_000_000], "autumn": [0, 500_000_000, 0]}
    chart = charts.stacked_bars(days, series)
    assert [t for _, t in chart.ticks] == ["$0.00", "$0.50", "$1.00", "$1.50", "$2.00"]
    plot = chart.baseline - charts.PAD_TOP
    day2 = [b for b in chart.bars if b.label.startswith("2026-12-01")]
    assert sum(b.height for b in day2) == pytest.approx(plot)  # $2.00 of a $2.00 axis
    assert all(b.x + b.width <= chart.right for b in chart.bars)
    assert [name for _, name, _ in chart.legend] == ["spring", "autumn"]
    assert not chart.empty


def test_many_series_fold_into_other() -> None:
    series = {f"c{i}": [i] for i in range(10)}
    folded = charts.fold(series)
    assert [name for name, _ in folded] == ["c9", "c8", "c7", "c6", "c5", "other"]
    assert folded[-1][1] == [sum(range(5))]


def test_nothing_billed_is_an_empty_chart() -> None:
    assert charts.stacked_bars(["2026-12-02"], {}).empty
