"""Content-adaptive token counts (vlt's extension of the method): per-image K over the nested pattern."""

from vlt.adaptive.allocation import (
    allocate,
    draw,
    k_histogram,
    lagrangian,
    mean_cost,
    solve_lambda,
    threshold,
    tilt_to_budget,
)

__all__ = [
    "allocate",
    "draw",
    "k_histogram",
    "lagrangian",
    "mean_cost",
    "solve_lambda",
    "threshold",
    "tilt_to_budget",
]
