"""Per-image distortion curves over the merge grid, measured once when latents are cached.

Letters: B images, N slots, C channels, G grid levels (ascending K of the global pattern).

Allocation needs D_i(K) for every image and every K of the nested pattern. Measuring them at cache
time costs one encode and G decodes per image, after which any budget, rule or cost can be solved in
milliseconds without touching the tokenizer again. The curves are PSNR in dB (the number we report);
allocation minimises D = -PSNR.

The sidecars (`LatentCache.save_curves` / `.curves`: keys, psnr, label, complexity, png_bytes, grid)
hold everything allocation reads, so it never has to open the latent shards.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlt.objectives.recon import psnr


@torch.no_grad()
def psnr_curves(model, images: Tensor, grid: list[int], *, z: Tensor | None = None) -> Tensor:
    """PSNR in dB of every image reconstructed at every K of the grid.

    Args:
        model: a `vlt.stages.VariableLengthTokenizer` (eval mode is the caller's job).
        images: (B, 3, H, W) in [-1, 1].
        grid: the K values, ascending.
        z: the full latents (B, N, C) when the caller already encoded them (encode once, decode G times).

    Returns:
        (B, G) float32 PSNR per image and level.
    """
    z = model.encode(images) if z is None else z  # (B, N, C)
    columns = []
    for k in grid:
        recon = model.detokenize(model.merge(z, int(k)).tokens)  # (B, 3, H, W)
        columns.append(psnr(images, recon))  # (B,)
    return torch.stack(columns, dim=1)  # (B, G)


def png_size(image: np.ndarray) -> int:
    """Bytes of one uint8 (H, W, 3) image PNG-encoded by PIL: a cheap content-complexity measure."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.tell()
