"""Quality-vs-FLOPs summaries: equal-quality savings and gains at equal FLOPs, on hand-made points."""

from __future__ import annotations

import math

import pytest

from vlt.metrics.pareto import Point, equal_quality_saving, gain_at_equal_flops, interpolate

FIXED = [Point(1.0, 8.0, 0.5), Point(2.0, 5.0, 0.4), Point(4.0, 3.0, 0.3), Point(8.0, 2.9, 0.3)]


def test_equal_quality_saving_takes_the_cheapest_point_inside_the_best_interval():
    method = [Point(3.0, 3.4, 0.2), Point(5.0, 3.1, 0.2), Point(6.0, 2.5, 0.2)]
    saving = equal_quality_saving(FIXED, method)
    assert saving.reference == FIXED[3]  # lowest mean: 2.9 +- 0.3, so 3.2 is the bar
    assert saving.point == method[1] and saving.saving == pytest.approx(1 - 5.0 / 8.0)
    assert equal_quality_saving(FIXED, [Point(3.0, 3.5, 0.1)]).saving is None


def test_gain_at_equal_flops_interpolates_in_log_flops():
    at = interpolate(FIXED, math.sqrt(2.0))  # half-way between 1 and 2 in log FLOPs
    assert at.mean == pytest.approx(6.5) and at.half == pytest.approx(0.45)
    gain, half = gain_at_equal_flops(FIXED, Point(math.sqrt(2.0), 6.0, 0.2))
    assert gain == pytest.approx(0.5) and half == pytest.approx(math.hypot(0.45, 0.2))
    assert gain_at_equal_flops(FIXED, Point(16.0, 2.0, 0.1)) is None  # beyond the fixed curve
    assert gain_at_equal_flops(FIXED, Point(2.0, 5.0, 0.4))[0] == pytest.approx(0.0)
