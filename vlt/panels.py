"""Pictures a person can judge: labelled image panels and merge-pattern pictures (numpy + PIL only).

Tiles are upscaled by an integer factor with nearest-neighbour (pixels stay pixels, no blur) to at
least `tile` pixels, rows and columns carry labels, and everything is one uint8 (H, W, 3) array: the
same picture goes to TensorBoard (`dataformats="HWC"`) and to a PNG in the run directory.

    pic = panel([inputs, recon_k4, recon_k32], row_labels=["input", "K=4", "K=32"], col_labels=classes)
    save_png(pic, run_dir / "panels" / "reconstructions.png")
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between tiles
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str, font) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def upscale(images: np.ndarray, tile: int) -> np.ndarray:
    """(B, H, W, 3) -> (B, f*H, f*W, 3) with the smallest integer f such that f*H >= tile."""
    factor = max(1, math.ceil(tile / images.shape[1]))
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def panel(
    rows: Sequence[np.ndarray],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    tile: int = 128,
) -> np.ndarray:
    """A grid of labelled rows: each row is (B, H, W, 3) uint8, shorter rows are left blank at the end.

    Returns (H, W, 3) uint8 with tiles of at least `tile` pixels.
    """
    if not rows:
        raise ValueError("panel needs at least one row of images")
    big = [upscale(np.asarray(r, dtype=np.uint8), tile) for r in rows]
    th, tw = big[0].shape[1:3]
    cols = max(len(r) for r in big)
    size = max(12, th // 9)
    font = _font(size)
    left = (
        GAP
        + max((_text_width(t, font) for t in row_labels or []), default=0)
        + (GAP * 3 if row_labels else 0)
    )
    top = GAP + (size + 2 * GAP if col_labels else 0) + (size + 3 * GAP if title else 0)
    height, width = top + len(big) * (th + GAP), left + cols * (tw + GAP)
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for r, images in enumerate(big):
        y = top + r * (th + GAP)
        for c, image in enumerate(images):
            x = left + c * (tw + GAP)
            canvas[y : y + th, x : x + tw] = image
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((GAP, GAP), title, fill=INK, font=font)
    label_y = top - size - GAP
    for c, text in enumerate(col_labels or []):
        x = left + c * (tw + GAP) + (tw - _text_width(text, font)) // 2
        draw.text((x, label_y), text, fill=INK, font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((GAP, top + r * (th + GAP) + (th - size) // 2), text, fill=INK, font=font)
    return np.asarray(picture)


def pattern_panel(assign: Mapping[int, np.ndarray], *, cell: int = 16) -> np.ndarray:
    """The global merge pattern: one row per K, one column per slot; slots of one merged token share a
    colour (the colour of its smallest slot, so nested cuts read as stripes merging), dropped slots
    (nested dropout's -1) are grey. Labelled rows (K), slot ticks and a legend line."""
    ks = sorted(assign)
    n = len(assign[ks[0]])
    hues = np.linspace(0, 1, n, endpoint=False)
    palette = (np.stack([np.sin(2 * np.pi * (hues + o)) for o in (0, 1 / 3, 2 / 3)], 1) + 1) / 2
    palette = (palette[np.random.default_rng(0).permutation(n)] * 230).astype(np.uint8)
    rows = []
    for k in ks:
        a = np.asarray(assign[k])
        first = np.array([np.flatnonzero(a == a[i]).min() if a[i] >= 0 else -1 for i in range(n)])
        colours = np.where(first[:, None] >= 0, palette[np.maximum(first, 0)], 200).astype(np.uint8)
        rows.append(
            np.repeat(np.repeat(colours[None, None], cell, axis=1), cell, axis=2)[0]
        )  # (cell, n*cell, 3)
    step = 4 if n > 16 else 1
    ticks = [str(i) if i % step == 0 else "" for i in range(n)]
    grid = panel(
        [row.reshape(cell, n, cell, 3).transpose(1, 0, 2, 3) for row in rows],
        row_labels=[f"K={k}" for k in ks],
        col_labels=ticks,
        title="merge pattern: columns are slots; one colour = one merged token (grey: dropped)",
        tile=cell,
    )
    return grid


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path
