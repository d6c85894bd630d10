"""Latent bottlenecks: encoder slot features (B, N, D) -> latents z (B, N, C) plus a KL term.

Letters: B batch, N slots, C latent channels, D encoder width.

Two choices:
- "kl": a diagonal Gaussian (mean, log-variance) with the KL to N(0, I), as in the paper's recipe
  (weight ~1e-6). Sampling happens only in training and only if `sample` is on.
- "layernorm": a linear projection then a LayerNorm over C without affine parameters. On tiny CPU
  runs it trains where the KL recipe collapsed, and it fixes the latent scale for the DiT.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

BottleneckKind = Literal["kl", "layernorm"]


class BottleneckOut(NamedTuple):
    z: Tensor  # (B, N, C) latent used downstream: a sample in KL training, else the mean
    mean: Tensor  # (B, N, C) the deterministic latent (for caching)
    kl: Tensor  # () KL per image (summed over N and C, averaged over B); 0 for "layernorm"


class KLBottleneck(nn.Module):
    """Diagonal Gaussian posterior. KL is summed over slots and channels, averaged over the batch
    (the LDM convention the 1e-6 weight assumes)."""

    def __init__(self, width: int, channels: int, *, sample: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 2 * channels)
        self.sample = sample

    def forward(self, h: Tensor) -> BottleneckOut:
        mean, logvar = self.proj(h).chunk(2, dim=-1)  # (B, N, C) each
        logvar = logvar.clamp(-30.0, 20.0)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2)).mean()
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.training and self.sample else mean
        return BottleneckOut(z=z, mean=mean, kl=kl)


class LayerNormBottleneck(nn.Module):
    """Linear D -> C, then LayerNorm over C (no affine): every slot latent has zero mean, unit variance."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, channels)
        self.norm = nn.LayerNorm(channels, elementwise_affine=False)

    def forward(self, h: Tensor) -> BottleneckOut:
        z = self.norm(self.proj(h))  # (B, N, C)
        return BottleneckOut(z=z, mean=z, kl=z.new_zeros(()))


def make_bottleneck(kind: BottleneckKind, *, width: int, channels: int, sample: bool = True) -> nn.Module:
    """Build a bottleneck by name; `sample` only matters for "kl"."""
    if kind == "kl":
        return KLBottleneck(width, channels, sample=sample)
    if kind == "layernorm":
        return LayerNormBottleneck(width, channels)
    raise ValueError(f"unknown bottleneck {kind!r}; choose one of 'kl', 'layernorm'")
