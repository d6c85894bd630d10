"""Multi-head self-attention on SDPA, with an optional additive key bias.

Letters: B batch, L sequence length (N slots, K merged tokens or P patches), D width, H heads.

Proportional attention (ToMe, and the paper's DiT): a merged token that stands for m_j slots gets the
additive logit bias log m_j, so attention over K merged tokens equals attention over the N unmerged
slots that broadcast them.

Two kernels carry the bias. "sdpa" passes it as SDPA's float `attn_mask`, which rules out the flash
kernel (the memory-efficient one takes it on CUDA); "flex" adds it in FlexAttention's `score_mod`, inside
one fused kernel on GPU (compiled on first use; on CPU it runs unfused, forward only). Either way the
bias exists only where sizes differ: with equal sizes (K = N, every fixed-K or nested-dropout pattern:
all m_j = 1) log m_j is one constant per query, which softmax ignores, so `size_bias` returns None and
SDPA may pick flash attention.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Kernel = Literal["sdpa", "flex"]
KERNELS: tuple[str, ...] = ("sdpa", "flex")


def size_bias(sizes: Tensor | None) -> Tensor | None:
    """Key bias log m for proportional attention.

    Args:
        sizes: (L,) or (B, L) token sizes m_j >= 1 (slots each token stands for), or None.

    Returns:
        None when there are no sizes or they are all equal (per image): a bias that is the same for every
        key changes nothing. Else a float mask broadcastable to SDPA's (B, H, L_q, L_k): (1, 1, 1, L) or
        (B, 1, 1, L).
    """
    if sizes is None or bool((sizes == sizes[..., :1]).all()):
        return None
    bias = sizes.float().clamp_min(1e-6).log()
    return bias.reshape(1, 1, 1, -1) if bias.ndim == 1 else bias[:, None, None, :]


class Attention(nn.Module):
    """Self-attention with fused QKV, optional QK-RMSNorm, and SDPA.

    Args:
        dim: model width D.
        heads: number of heads H (D divisible by H).
        qk_norm: RMS-normalise queries and keys per head (LightningDiT); stabilises large widths.
        kernel: "sdpa" (the bias as a float mask) or "flex" (FlexAttention, the bias in `score_mod`).
    """

    def __init__(self, dim: int, heads: int, *, qk_norm: bool = False, kernel: Kernel = "sdpa") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel {kernel!r} is not supported; choose one of {KERNELS}")
        if kernel == "flex" and not flex_available():
            raise ValueError(
                f"attention kernel 'flex' needs torch.nn.attention.flex_attention (torch {torch.__version__})"
            )
        self.heads, self.kernel = heads, kernel
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
        if self.kernel == "flex":
            out = flex_key_bias(q, k, v, bias)  # (B, H, L, E)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, L, E)
        return self.proj(rearrange(out, "b h l e -> b l (h e)"))


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_key_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """FlexAttention with an additive key bias: q, k, v (B, H, L, E), bias (1 or B, 1, 1, L) or None.

    On CUDA the compiled kernel (fused, with backward); elsewhere the unfused reference (forward only
    on CPU), whose "called without torch.compile" warning is expected there and filtered."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if bias is not None:
        key_bias = bias.reshape(bias.shape[0], -1)  # (1 or B, L)
        if key_bias.shape[0] == 1:
            key_bias = key_bias[0]

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + key_bias[kv_idx]
        else:

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + key_bias[b, kv_idx]

    if q.is_cuda:
        return _compiled_flex()(q, k, v, score_mod=score_mod)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=score_mod)
