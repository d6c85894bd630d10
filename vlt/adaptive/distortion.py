"""Per-image distortion curves over the merge grid, measured once when latents are cached.

Letters: B images, N slots, C channels, G grid levels (ascending K of the global pattern).

Allocation needs D_i(K) for every image and every K of the nested pattern. Measuring them at cache
time costs one encode and G decodes per image, after which any budget, rule or cost can be solved in
milliseconds without touching the tokenizer again. The curves are PSNR in dB (the number we report);
allocation minimises D = -PSNR.

The sidecar `<cache>/curves-<split>-r<rank>.npz` (keys, psnr, label, complexity, png_bytes, grid)
holds everything allocation reads, so it never has to open the latent shards.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlt.objectives.recon import psnr


class Curves(NamedTuple):
    """The curve sidecars of one split, concatenated over ranks (S samples, G levels)."""

    keys: list[str]
    psnr: np.ndarray  # (S, G) float32 dB
    label: np.ndarray  # (S,) int64
    complexity: np.ndarray  # (S,) int64
    png_bytes: np.ndarray  # (S,) int64
    grid: list[int]


@torch.no_grad()
def psnr_curves(model, images: Tensor, grid: list[int], *, z: Tensor | None = None) -> Tensor:
    """PSNR in dB of every image reconstructed at every K of the grid.

    Args:
        model: a tokenizer with `encode(images) -> z`, `merger(z, k).z_hat` and `tokenizer.decode`
            (`LitTokenizer`); eval mode is the caller's job (the cache sets it once).
        images: (B, 3, H, W) in [-1, 1].
        grid: the K values, ascending.
        z: the full latents (B, N, C) when the caller already encoded them (encode once, decode G times).

    Returns:
        (B, G) float32 PSNR per image and level.
    """
    z = model.encode(images) if z is None else z  # (B, N, C)
    columns = []
    for k in grid:
        recon = model.tokenizer.decode(model.merger(z, int(k)).z_hat)  # (B, 3, H, W)
        columns.append(psnr(images, recon))  # (B,)
    return torch.stack(columns, dim=1)  # (B, G)


def png_size(image: np.ndarray) -> int:
    """Bytes of one uint8 (H, W, 3) image PNG-encoded by PIL: a cheap content-complexity measure."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.tell()


def save_curves(path: str | Path, curves: Curves) -> Path:
    """Write one sidecar npz (keys, psnr, label, complexity, png_bytes, grid)."""
    path = Path(path)
    np.savez(
        path,
        keys=np.asarray(curves.keys, dtype=str),
        psnr=np.asarray(curves.psnr, dtype=np.float32).reshape(len(curves.keys), len(curves.grid)),
        label=np.asarray(curves.label, dtype=np.int64),
        complexity=np.asarray(curves.complexity, dtype=np.int64),
        png_bytes=np.asarray(curves.png_bytes, dtype=np.int64),
        grid=np.asarray(curves.grid, dtype=np.int64),
    )
    return path


def load_curves(cache: str | Path, split: str) -> Curves:
    """All ranks' sidecars of a split; a clear error naming the command when there are none."""
    files = sorted(Path(cache).glob(f"curves-{split}-r*.npz"))
    if not files:
        raise FileNotFoundError(
            f"no distortion curves for split {split!r} in {cache}: rebuild the cache with "
            f"`vlt cache-latents --split {split} --out {cache} --distortion true ...` "
            "(the tokenizer must have a merge table)"
        )
    parts = [dict(np.load(f)) for f in files]
    grids = {tuple(p["grid"].tolist()) for p in parts}
    if len(grids) != 1:
        raise ValueError(f"curve sidecars of {split!r} in {cache} disagree on the grid: {sorted(grids)}")
    return Curves(
        keys=[str(k) for p in parts for k in p["keys"].tolist()],
        psnr=np.concatenate([p["psnr"] for p in parts]).astype(np.float32),
        label=np.concatenate([p["label"] for p in parts]).astype(np.int64),
        complexity=np.concatenate([p["complexity"] for p in parts]).astype(np.int64),
        png_bytes=np.concatenate([p["png_bytes"] for p in parts]).astype(np.int64),
        grid=list(grids.pop()),
    )
