"""Real photographs that ship inside Python wheels (no download), and random square crops of them.

Letters: H height, W width, 3 RGB channels.

Sources: the RGB photos bundled with scikit-image (`skimage.data`) and scikit-learn's two sample
images (`load_sample_images`: china, flower). Loading is best effort: a source that fails (package
missing, or a version that would download it) is skipped and reported, never fatal.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

# skimage.data loaders of RGB photographs that live inside the wheel (others download and fail offline).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
SKLEARN_PHOTOS: tuple[str, ...] = ("china", "flower")


@dataclass(frozen=True)
class Photo:
    """A named source photo, (H, W, 3) uint8."""

    name: str
    pixels: np.ndarray


def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        out = getattr(importlib.import_module("skimage.data"), name)()
        return out[0] if isinstance(out, tuple) else out  # stereo_motorcycle -> (left, right, disparity)

    return load


def _sklearn_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        bunch = importlib.import_module("sklearn.datasets").load_sample_images()
        index = [f.rsplit("/", 1)[-1].split(".")[0] for f in bunch.filenames].index(name)
        return bunch.images[index]

    return load


def load_photos() -> tuple[list[Photo], dict[str, str]]:
    """All loadable RGB source photos in a fixed order, and {name: reason} for those that failed."""
    loaders = {n: _skimage_loader(n) for n in SKIMAGE_PHOTOS} | {
        n: _sklearn_loader(n) for n in SKLEARN_PHOTOS
    }
    photos, failed = [], {}
    for name, load in loaders.items():
        try:
            pixels = np.asarray(load())
        except Exception as exc:  # any loader failure (ImportError, download attempt, ...) skips it
            failed[name] = f"{type(exc).__name__}: {exc}"
            continue
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            failed[name] = f"not an RGB uint8 photo: shape {pixels.shape}, dtype {pixels.dtype}"
            continue
        photos.append(Photo(name=name, pixels=pixels))
    return photos, failed


def random_crop(
    photo: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    min_scale: float = 0.125,
    max_scale: float = 0.5,
) -> np.ndarray:
    """A random square crop whose side is a log-uniform fraction of the short side, resized to size.

    Several scales give both detailed (small crop, little content) and busy (large crop, a whole
    scene squeezed into few pixels) images, i.e. a spread of complexity.
    """
    h, w = photo.shape[:2]
    short = min(h, w)
    frac = float(np.exp(rng.uniform(np.log(min_scale), np.log(max_scale))))
    side = max(size, round(frac * short))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = Image.fromarray(photo[top : top + side, left : left + side])
    return np.asarray(patch.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0))


def edge_complexity(pixels: np.ndarray) -> int:
    """Cheap 0..10 complexity proxy: tenths of pixels whose luminance gradient exceeds 4% of the range.

    On the same 0..10 scale as the synthetic shape count, so both sets can share one histogram;
    it is a proxy (texture and edges), not a ground truth. The 4% threshold spreads 32x32 crops of
    the embedded photos over about 0..8 (8% crowds them into 0..4).
    """
    lum = pixels.astype(np.float32).mean(axis=2) / 255.0  # (H, W)
    gy, gx = np.gradient(lum)
    busy = float((np.hypot(gx, gy) > 0.04).mean())
    return int(min(10, round(10 * busy)))
