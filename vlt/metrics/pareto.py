"""Quality against compute: the two numbers that decide whether a sampler saves anything.

Letters: P points. A point is (flops, mean, half): FLOPs per image and a distance (lower is better)
with the half-width of its interval.

- `equal_quality_saving`: the best fixed-K point (lowest distance) sets the quality to match; a
  method matches it when its mean lies within that point's interval (mean <= best + half). The saving
  is 1 - FLOPs of the method's cheapest matching point / FLOPs of the best fixed K.
- `gain_at_equal_flops`: the fixed-K curve interpolated (linearly in log FLOPs) at a method point's
  FLOPs, minus the point's distance, with the half-width sqrt(h_fixed^2 + h_point^2) of independent
  estimates (the interpolated half-width is interpolated too): positive = better than fixed K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple


class Point(NamedTuple):
    flops: float
    mean: float
    half: float


class Saving(NamedTuple):
    """The cheapest matching point (None: no point matches) and its saving against `reference`."""

    reference: Point
    point: Point | None
    saving: float | None


def best(points: Sequence[Point]) -> Point:
    """The lowest-distance point."""
    if not points:
        raise ValueError("no points")
    return min(points, key=lambda p: p.mean)


def equal_quality_saving(fixed: Sequence[Point], method: Sequence[Point]) -> Saving:
    """FLOPs saved by the cheapest `method` point within the interval of the best `fixed` point."""
    reference = best(fixed)
    matching = [p for p in method if p.mean <= reference.mean + reference.half]
    if not matching:
        return Saving(reference, None, None)
    point = min(matching, key=lambda p: p.flops)
    return Saving(reference, point, 1.0 - point.flops / reference.flops)


def interpolate(fixed: Sequence[Point], flops: float) -> Point | None:
    """The fixed-K curve at `flops` (linear in log FLOPs between its neighbours; None outside it)."""
    curve = sorted(fixed)
    for lo, hi in pairwise(curve):
        if lo.flops <= flops <= hi.flops:
            w = 0.0 if hi.flops == lo.flops else math.log(flops / lo.flops) / math.log(hi.flops / lo.flops)
            return Point(flops, lo.mean + w * (hi.mean - lo.mean), lo.half + w * (hi.half - lo.half))
    if curve and math.isclose(flops, curve[0].flops):
        return curve[0]
    return None


def gain_at_equal_flops(fixed: Sequence[Point], point: Point) -> tuple[float, float] | None:
    """(interpolated fixed distance - point distance, half-width); None outside the fixed range."""
    at = interpolate(fixed, point.flops)
    if at is None:
        return None
    return at.mean - point.mean, math.hypot(at.half, point.half)
