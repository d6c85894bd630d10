"""Fixed 2D sin-cos position embeddings for patch grids (learned slot embeddings live in the models)."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid*grid, dim) sin-cos embedding of a square patch grid, row-major. dim divisible by 4."""
    if dim % 4:
        raise ValueError(f"sin-cos 2D embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None].double() * omega[None]  # (P, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()
