"""Images of every PIL mode and bit depth become the right 8-bit RGB (alpha over white)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlt.data.transforms import decode_image

GRAY = np.array([[0, 64], [128, 255]], dtype=np.uint8)  # 2x2 reference levels
GRAY_RGB = np.repeat(GRAY[..., None], 3, axis=2)


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data))


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.fromarray(GRAY, "L"), "PNG"),
        (Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG"),  # 16-bit grayscale PNG (I;16)
        (Image.fromarray(GRAY.astype(np.int32) * 257, "I"), "TIFF"),  # 32-bit integer holding 16-bit data
        (Image.fromarray(GRAY.astype(np.float32) / 255, "F"), "TIFF"),  # float in [0, 1]
        (Image.fromarray(GRAY_RGB, "RGB").convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        (Image.fromarray(GRAY_RGB, "RGB").convert("CMYK"), "TIFF"),
        (Image.fromarray(GRAY_RGB, "RGB").convert("YCbCr"), "TIFF"),
    ],
    ids=["L", "I;16", "I", "F", "P", "CMYK", "YCbCr"],
)
def test_modes_and_depths_keep_their_levels(image, fmt):
    assert np.abs(rgb(encoded(image, fmt)).astype(int) - GRAY_RGB).max() <= 1


def test_alpha_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, alpha 0, 128, 255, 255
    rgba[..., 3] = [[0, 128], [255, 255]]
    out = rgb(encoded(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    assert out[0, 1, 1] in (127, 128)  # half transparent red over white
    la = rgb(encoded(Image.fromarray(np.stack([GRAY, np.zeros_like(GRAY)], -1), "LA")))
    assert (la == 255).all()
    palette = Image.fromarray(GRAY_RGB, "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    assert rgb(encoded(palette))[0, 0].tolist() == [255, 255, 255]


def test_one_bit_and_exif_orientation():
    bits = rgb(encoded(Image.fromarray(GRAY > 100).convert("1")))
    assert bits[:, :, 0].tolist() == [[0, 0], [255, 255]]
    img = Image.fromarray(np.array([[0, 255]], np.uint8), "L")  # 1x2, rotated 90 degrees by EXIF
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=100)
    assert rgb(buf.getvalue()).shape == (2, 1, 3)
