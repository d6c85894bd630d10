"""Procedural images of known complexity: smooth colour gradients with 0..10 random shapes.

Letters: H height, W width, 3 RGB channels.

Each image is drawn at 2x resolution and box-downsampled, so shape edges are anti-aliased like real
photos instead of aliased staircases. The complexity of an image is its shape count (uniform over
0..max_shapes), the ground truth that content-adaptive token counts should track. The class label is
the hue bucket of the background (10 buckets of the colour wheel), independent of the complexity, so
class-conditional models cannot read the label off the shape count.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("rectangle", "disk", "stripes")
N_CLASSES = 10


@dataclass(frozen=True)
class SyntheticImage:
    """One rendered image: pixels (H, W, 3) uint8, label (hue bucket), complexity (shape count)."""

    pixels: np.ndarray
    label: int
    complexity: int
    shapes: tuple[str, ...]


@functools.lru_cache(maxsize=4)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (S, S) y and x, computed once per side length."""
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated-ish random RGB colour in [0, 1] (3,)."""
    h, s, v = rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _background(rng: np.random.Generator, side: int) -> tuple[np.ndarray, int]:
    """Linear gradient between two colours of nearby hue, in a random direction: (S, S, 3), label."""
    hue = rng.random()
    label = int(hue * N_CLASSES) % N_CLASSES
    hue2 = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    c0 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.9), rng.uniform(0.5, 1.0)))
    c1 = np.array(colorsys.hsv_to_rgb(hue2, rng.uniform(0.3, 0.9), rng.uniform(0.2, 0.8)))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(side)  # (S, S) each
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / np.sqrt(0.5) + 0.5  # (S, S)
    t = np.clip(t, 0, 1)[..., None]  # (S, S, 1)
    return (1 - t) * c0 + t * c1, label  # (S, S, 3)


def _shape_mask(rng: np.random.Generator, kind: str, side: int) -> np.ndarray:
    """Boolean (S, S) mask of one shape at a random position and scale (5%..50% of the side)."""
    yy, xx = _grid(side)  # (S, S) each
    cy, cx = rng.random(2)
    scale = rng.uniform(0.05, 0.5)
    if kind == "rectangle":
        hh, hw = scale * rng.uniform(0.4, 1.0, size=2)
        return (np.abs(yy - cy) < hh) & (np.abs(xx - cx) < hw)
    if kind == "disk":
        return (yy - cy) ** 2 + (xx - cx) ** 2 < (scale * 0.6) ** 2
    # stripes: a square patch of parallel bands, random orientation and period
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.04, 0.15)
    phase = np.cos(angle) * xx + np.sin(angle) * yy
    bands = np.mod(phase, period) < period / 2
    return bands & (np.abs(yy - cy) < scale) & (np.abs(xx - cx) < scale)


def render(rng: np.random.Generator, size: int = 32, max_shapes: int = 10) -> SyntheticImage:
    """Draw one image with `rng`: background, then n ~ U{0..max_shapes} shapes painted in order."""
    side = 2 * size
    canvas, label = _background(rng, side)  # (S, S, 3) float in [0, 1]
    n = int(rng.integers(0, max_shapes + 1))
    kinds = tuple(SHAPES[i] for i in rng.integers(0, len(SHAPES), size=n))
    for kind in kinds:
        mask = _shape_mask(rng, kind, side)  # (S, S)
        canvas[mask] = _random_colour(rng)
    small = canvas.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))  # (H, W, 3) box downsample
    pixels = np.clip(np.round(small * 255), 0, 255).astype(np.uint8)
    return SyntheticImage(pixels=pixels, label=label, complexity=n, shapes=kinds)
