"""Training images and targets for the feature net (`vlt features`), drawn from the embedded recipes.

Letters: B batch (pool size), H/W height/width, G = GRID x GRID occupancy cells.

Synthetic images come from the same renderer as `vlt data synthetic`, with seeds in their own
namespace (split code 2: never a train or val image of the shards), plus what the renderer knows:
background hue class, shape count, count of each shape kind, and where shapes lie (the fraction of
each cell of a GRID x GRID grid that shapes cover). Photo crops come from the training photos only
(the val photos stay unseen), with their source photo and crop scale as targets. Nothing is
downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlt.data import photos as photo_lib
from vlt.data import synthetic as synthetic_lib

GRID = 4
VAL_PHOTOS = ("coffee", "flower")  # the photos shards' default val sources
SPLIT_CODE = 2  # the shards use 0 (train) and 1 (val): a feature-net image is never a shard image


def render_annotated(
    rng: np.random.Generator, size: int = 32, max_shapes: int = 10
) -> tuple[synthetic_lib.SyntheticImage, np.ndarray]:
    """`synthetic.render` (same random draws, same pixels) plus the union mask of its shapes (H, W) float.

    The renderer's helpers are replayed in its order, so an image here equals `render(rng)` for the
    same generator state (a test holds the two together).
    """
    side = 2 * size
    canvas, label = synthetic_lib._background(rng, side)  # (S, S, 3)
    n = int(rng.integers(0, max_shapes + 1))
    kinds = tuple(synthetic_lib.SHAPES[i] for i in rng.integers(0, len(synthetic_lib.SHAPES), size=n))
    covered = np.zeros((side, side), dtype=bool)
    for kind in kinds:
        mask = synthetic_lib._shape_mask(rng, kind, side)  # (S, S)
        canvas[mask] = synthetic_lib._random_colour(rng)
        covered |= mask
    small = canvas.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))  # (H, W, 3)
    pixels = np.clip(np.round(small * 255), 0, 255).astype(np.uint8)
    image = synthetic_lib.SyntheticImage(pixels=pixels, label=label, complexity=n, shapes=kinds)
    return image, covered.reshape(size, 2, size, 2).mean(axis=(1, 3))  # (H, W)


@dataclass
class FeaturePool:
    """Images and targets for the feature net; -1 (or NaN) marks a target an image does not have.

    images (B, H, W, 3) uint8; hue (B,) class or -1; count (B,) shape count or -1; kinds (B, 3)
    count per shape kind (NaN for photos); cells (B, G) covered fraction per cell (NaN for photos);
    source (B,) 0 = synthetic, 1 + i = training photo i; scale (B,) log crop fraction (NaN if synthetic).
    """

    images: np.ndarray
    hue: np.ndarray
    count: np.ndarray
    kinds: np.ndarray
    cells: np.ndarray
    source: np.ndarray
    scale: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _cells(covered: np.ndarray) -> np.ndarray:
    """(H, W) covered fraction -> (G,) mean per cell of a GRID x GRID grid."""
    h, w = covered.shape
    return covered.reshape(GRID, h // GRID, GRID, w // GRID).mean(axis=(1, 3)).reshape(-1)


def _crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A random crop as in `vlt data photos` (log-uniform side 1/8..1/2), and its log side fraction."""
    log_frac = float(rng.uniform(np.log(0.125), np.log(0.5)))
    frac = float(np.exp(log_frac))
    return photo_lib.random_crop(photo, rng, size=size, min_scale=frac, max_scale=frac), log_frac


def build_pool(n_synthetic: int, n_photos: int, *, seed: int, size: int = 32) -> FeaturePool:
    """A deterministic pool: `n_synthetic` rendered images then `n_photos` crops of the training photos."""
    n = n_synthetic + n_photos
    images = np.zeros((n, size, size, 3), np.uint8)
    hue, count, source = np.full(n, -1), np.full(n, -1), np.zeros(n, np.int64)
    kinds, cells = np.full((n, 3), np.nan), np.full((n, GRID * GRID), np.nan)
    scale = np.full(n, np.nan)
    for i in range(n_synthetic):
        image, covered = render_annotated(np.random.default_rng([seed, SPLIT_CODE, i]), size)
        images[i], hue[i], count[i] = image.pixels, image.label, image.complexity
        kinds[i] = [image.shapes.count(kind) for kind in synthetic_lib.SHAPES]
        cells[i] = _cells(covered)
    photos = [p for p in photo_lib.load_photos()[0] if p.name not in VAL_PHOTOS]
    if n_photos and not photos:
        raise ValueError("no training photo could be loaded (scikit-image / scikit-learn sample images)")
    rng = np.random.default_rng([seed, SPLIT_CODE, n_synthetic])
    for j in range(n_photos):
        i = n_synthetic + j
        images[i], scale[i] = _crop(photos[j % len(photos)].pixels, rng, size)
        source[i] = 1 + j % len(photos)
    return FeaturePool(images, hue, count, kinds, cells, source, scale)


def flip(pool: FeaturePool, index: np.ndarray, horizontal: np.ndarray, vertical: np.ndarray) -> dict:
    """Targets and images (B, H, W, 3) of `index` with per-image flips; cell targets flip with them.

    Photos are only flipped horizontally (upright scenes); synthetic images both ways.
    """
    images, cells = pool.images[index].copy(), pool.cells[index].reshape(-1, GRID, GRID).copy()
    vertical = vertical & (pool.source[index] == 0)
    images[horizontal], cells[horizontal] = images[horizontal, :, ::-1], cells[horizontal, :, ::-1]
    images[vertical], cells[vertical] = images[vertical, ::-1], cells[vertical, ::-1]
    return {
        "images": images,
        "hue": pool.hue[index],
        "count": pool.count[index],
        "kinds": pool.kinds[index],
        "cells": cells.reshape(len(index), -1),
        "source": pool.source[index],
        "scale": pool.scale[index],
    }
