"""Multi-head self-attention on SDPA, with an optional additive key bias.

Letters: B batch, L sequence length (N slots, K merged tokens or P patches), D width, H heads.

Proportional attention (ToMe, and the paper's DiT): a merged token that stands for m_j slots gets the
additive logit bias log m_j, so attention over K merged tokens equals attention over the N unmerged
slots that broadcast them. The bias rides in SDPA's `attn_mask` as a float tensor.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def size_bias(sizes: Tensor | None) -> Tensor | None:
    """Key bias log m for proportional attention.

    Args:
        sizes: (L,) or (B, L) token sizes m_j >= 1 (slots each token stands for), or None.

    Returns:
        None, or a float mask broadcastable to SDPA's (B, H, L_q, L_k): (1, 1, 1, L) or (B, 1, 1, L).
    """
    if sizes is None:
        return None
    bias = sizes.float().clamp_min(1e-6).log()
    return bias.reshape(1, 1, 1, -1) if bias.ndim == 1 else bias[:, None, None, :]


class Attention(nn.Module):
    """Self-attention with fused QKV, optional QK-RMSNorm, and SDPA.

    Args:
        dim: model width D.
        heads: number of heads H (D divisible by H).
        qk_norm: RMS-normalise queries and keys per head (LightningDiT); stabilises large widths.
    """

    def __init__(self, dim: int, heads: int, *, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x: (B, L, D); bias: additive float mask broadcastable to (B, H, L, L), e.g. `size_bias`."""
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, L, E)
        return self.proj(rearrange(out, "b h l e -> b l (h e)"))
