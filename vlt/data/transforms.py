"""Image transforms for the data path: bytes -> PIL -> uint8 array -> float batch in [-1, 1].

Letters: B batch, H height, W width (image_size), 3 RGB channels.

Only PIL, numpy and torch (torchvision does not load beside the CPU torch build used here). Samples
stay uint8 (H, W, 3) until a whole batch exists, then one vectorised conversion makes the float
tensor: per-sample float conversion is the main per-sample cost on small images.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps

if TYPE_CHECKING:
    import torch

Crop = Literal["center", "random"]
CROPS: tuple[str, ...] = ("center", "random")
IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
ALPHA_BACKGROUND = (255, 255, 255, 255)  # transparent pixels become white (see `to_rgb`)


def check_crop(crop: str) -> None:
    """Raise a ValueError naming `crop` and the allowed values when it is not one of them."""
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r} is not supported; choose one of {CROPS}")


def decode_image(data: bytes, size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image (`to_rgb`); raises (OSError, ValueError, ...) on bad bytes.

    `size` lets JPEG decode at a reduced scale (`draft`), which is several times faster for large
    photos that are resized to a small `size` afterwards anyway.
    """
    img = Image.open(io.BytesIO(data))
    if size is not None and img.format == "JPEG":
        img.draft("RGB", (size, size))
    img.load()  # force the full decode here so truncated files fail now, not later
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode and bit depth -> an 8-bit RGB image, upright (EXIF orientation applied).

    - 16-bit integer modes (I;16*, and I, which is how 16-bit PNG/TIFF data arrives) are scaled from
      0..65535 to 0..255 (x / 257), not clipped at 255 as PIL's own conversion does;
    - F (32-bit float) is read as 0..1 (values outside are clipped);
    - alpha (RGBA, LA, La, PA, RGBa, P with a transparency key) is composited over WHITE: what a
      viewer shows on a page, and what transparent pixels of logos and icons are meant to be;
    - LAB goes through a CIE L*a*b* -> sRGB transform; CMYK, YCbCr, HSV, 1, L, P through PIL.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        gray = np.asarray(img, dtype=np.float64)  # (H, W)
        gray = gray * 255.0 if mode == "F" else gray / 257.0
        gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray8[..., None], 3, axis=2), "RGB")
    if mode == "LAB":
        return ImageCms.applyTransform(img, _lab_to_srgb())
    if mode in ("RGBA", "LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, ALPHA_BACKGROUND), rgba).convert("RGB")
    return img.convert("RGB")


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the short side equals `size` (aspect ratio kept); no-op when it already does."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The ADM centre crop: the ImageNet preprocessing of Dhariwal & Nichol's ADM (guided-diffusion),
    which DiT, SiT and most ImageNet-256/512 FID numbers use, as a (size, size) RGB image.

    1. While the short side is at least 2 * size, halve both sides (floor) with a BOX filter: large
       photos are reduced by area averaging, so the bicubic step never minifies by more than 2x.
    2. Resize with BICUBIC so that the short side is exactly `size` (the long side rounded).
    3. Cut the centre square; an odd margin leaves the extra pixel on the right / bottom.

    Unlike `resize_short_side` + `crop_square` (vlt's loader path), no JPEG draft decoding and no PIL
    `reducing_gap` shortcut: the pixels follow the protocol, so FID against reference batches made this
    way compares like with like.
    """
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def crop_square(
    arr: np.ndarray, size: int, crop: Crop = "center", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Square `size` crop of an (H', W', 3) array whose short side is `size`: centred or random."""
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return arr[top : top + size, left : left + size]


def image_array(
    data: bytes,
    size: int,
    *,
    crop: Crop = "center",
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Image bytes -> uint8 (size, size, 3): decode, resize short side, crop, optional random h-flip."""
    img = resize_short_side(decode_image(data, size), size)
    arr = crop_square(np.asarray(img), size, crop, rng)  # (H, W, 3) uint8
    if flip and (rng if rng is not None else np.random.default_rng()).random() < 0.5:
        arr = arr[:, ::-1]
    return arr


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]: x / 127.5 - 1 (0 -> -1, 255 -> 1).

    Done in numpy (single-threaded): torch's intra-op threads only contend with loader workers here.
    """
    arr = np.asarray(images)  # (B, H, W, 3) uint8
    x = arr.transpose(0, 3, 1, 2).astype(np.float32, order="C")  # (B, 3, H, W), contiguous copy
    np.divide(x, 127.5, out=x)
    np.subtract(x, 1.0, out=x)
    import torch  # here, not at the top: the shard builders use this module and start without torch

    return torch.from_numpy(x)


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Inverse of `to_unit_range`: float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded."""
    x = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    x = np.rint((np.clip(x, -1, 1) + 1) * np.float32(127.5))  # (B, 3, H, W)
    return x.astype(np.uint8).transpose(0, 2, 3, 1)
