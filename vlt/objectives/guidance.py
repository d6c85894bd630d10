"""Classifier-free guidance on merged tokens, per position and on every channel.

Letters: B batch, N slots, K merged tokens, C channels.

v = v_u + s_j (v_c - v_u) with the per-token scale s_j = 1 + (w - 1) / m_j: a token that stands for
m_j slots averages m_j slot-level guidance directions, so its guidance is damped by 1/m_j; with
m_j = 1 (no merging) this is ordinary CFG at scale w.

DiT's reference sampler guides only `[:, :3]`, the first three channels, a leftover from its
4-channel SD-VAE experiments; copied into 16- or 32-channel latent models, it silently leaves the
other channels unguided. Here every channel is guided; a test checks that each one moves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def position_scale(scale: float, sizes: Tensor) -> Tensor:
    """Effective per-token scale 1 + (w - 1)/m_j: sizes (K,) -> (1, K, 1), or (B, K) -> (B, K, 1)."""
    s = 1 + (scale - 1) / sizes.float()
    return s.reshape(1, -1, 1) if s.ndim == 1 else s[..., None]


def combine(v_cond: Tensor, v_uncond: Tensor, scale: float, sizes: Tensor) -> Tensor:
    """Guided velocity from the two predictions (B, K, C), all channels."""
    s = position_scale(scale, sizes).to(v_cond)  # (1 or B, K, 1)
    return v_uncond + s * (v_cond - v_uncond)  # (B, K, C)


def in_interval(t: Tensor, interval: tuple[float, float] | None) -> Tensor:
    """(B,) bool: where guidance applies. interval (lo, hi) in flow time (0 noise, 1 data); None: always."""
    if interval is None:
        return torch.ones_like(t, dtype=torch.bool)
    lo, hi = interval
    return (t >= lo) & (t <= hi)


def guided_velocity(
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    gbar: Tensor,
    sizes: Tensor,
    *,
    scale: float,
    null_label: int,
    interval: tuple[float, float] | None = None,
    uniform: bool = False,
) -> Tensor:
    """Velocity with classifier-free guidance, from one batched forward of [cond; uncond].

    Args:
        model: called as model(x, t, y, gbar, sizes) -> (B, K, C).
        x: (B, K, C) current state; t: (B,) flow time; y: (B,) labels.
        gbar: (N, K) or (B, N, K); sizes: (K,) or (B, K).
        scale: guidance weight w (1 = no guidance).
        null_label: the label that means "unconditional".
        interval: guide only where t lies in [lo, hi]; elsewhere the conditional prediction is used.
        uniform: scale w on every token (plain CFG) instead of 1 + (w - 1)/m_j.

    Returns:
        (B, K, C) guided velocity.
    """
    active = in_interval(t, interval)  # (B,)
    if not active.any():
        return model(x, t, y, gbar, sizes)
    b = x.shape[0]
    y_null = torch.full_like(y, null_label)
    gbar2 = gbar if gbar.ndim == 2 else torch.cat([gbar, gbar])
    sizes2 = sizes if sizes.ndim == 1 else torch.cat([sizes, sizes])
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), gbar2, sizes2)  # (2B, K, C)
    v_cond, v_uncond = v[:b], v[b:]
    guided = combine(v_cond, v_uncond, scale, torch.ones_like(sizes) if uniform else sizes)  # (B, K, C)
    return torch.where(active[:, None, None], guided, v_cond)
