"""adaLN conditioning pieces for diffusion transformers: scalar and label embedders, modulation.

Letters: B batch, L sequence length, D width, F sinusoidal frequency width.

A DiT block is conditioned on one vector c (B, D) per image (timestep + class, optionally the token
count K). adaLN-Zero maps c to shift/scale/gate triples whose linear layer starts at zero, so every
residual branch starts closed and the untrained network is the identity on its tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: (B, L, D), shift/scale: (B, D) -> x * (1 + scale) + shift per image."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sinusoidal(values: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """(B,) real values -> (B, dim) [cos | sin] features at geometric frequencies 1 .. 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)  # (F/2,)
    angles = values.float()[:, None] * freqs[None]  # (B, F/2)
    emb = torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, 2*(F/2))
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ScalarEmbedder(nn.Module):
    """Embed a scalar per image (flow time t, token count K) as sinusoidal features -> MLP -> (B, D).

    Args:
        dim: output width D.
        freq_dim: sinusoidal feature width F.
        scale: multiplies the value first. Flow time lives in [0, 1]; scaling it by 1000 (as DiT's
            integer timesteps) spreads it over the whole frequency range instead of the slowest few.
    """

    def __init__(self, dim: int, *, freq_dim: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, values: Tensor) -> Tensor:
        """values: (B,) -> (B, D)."""
        feats = sinusoidal(values * self.scale, self.freq_dim)  # (B, F)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D), with label dropout for classifier-free guidance.

    Label `num_classes` is the null ("unconditional") label; its row exists whenever dropout > 0, so
    the same network predicts the unconditional velocity that guidance extrapolates from.

    Args:
        num_classes: number of real classes.
        dim: output width D.
        dropout: probability of replacing a label by the null label in training.
    """

    def __init__(self, num_classes: int, dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"label dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + int(dropout > 0), dim)

    def token_drop(self, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Labels after dropout: random at rate `dropout` in training, or exactly where
        `force_drop_ids == 1` when given (train or eval). y: (B,) long -> (B,) long."""
        if force_drop_ids is not None:
            drop = force_drop_ids.to(y.device) == 1
        elif self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
        else:
            return y
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def forward(self, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """y: (B,) long in [0, num_classes] -> (B, D)."""
        return self.table(self.token_drop(y, force_drop_ids))


class AdaLN(nn.Module):
    """c (B, D) -> `chunks` modulation vectors (B, D) through SiLU + Linear, zero-initialised (adaLN-Zero)."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)
        self.zero_()

    def zero_(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(nn.functional.silu(c)).chunk(self.chunks, dim=-1)
