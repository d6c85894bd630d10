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
from vlt.adaptive.distortion import Curves, load_curves, psnr_curves, save_curves
from vlt.adaptive.predictor import CurvePredictor, fit_predictor, load_predictor, predict, save_predictor

__all__ = [
    "CurvePredictor",
    "Curves",
    "allocate",
    "draw",
    "fit_predictor",
    "k_histogram",
    "lagrangian",
    "load_curves",
    "load_predictor",
    "mean_cost",
    "predict",
    "psnr_curves",
    "save_curves",
    "save_predictor",
    "solve_lambda",
    "threshold",
    "tilt_to_budget",
]
