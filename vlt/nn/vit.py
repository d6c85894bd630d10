"""Pre-norm ViT blocks: the encoder and decoder stacks of the 1D tokenizer.

Letters: B batch, L sequence length (patches plus slots), D width.

Two timm/DINOv2 details are options, so that the released reference tokenizer (a DINOv2 ViT-B) loads
as is: LayerScale (a learned per-channel gain on each residual branch, `layer_scale` its initial
value) and the LayerNorm epsilon (timm's ViTs use 1e-6, torch's default is 1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlt.nn.attention import Attention
from vlt.nn.mlp import Mlp


class LayerScale(nn.Module):
    """x * gamma, gamma (D,) learned, starting at `init` (CaiT; DINOv2 uses 1e-5)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(Attn(LN(x))), then x + ls2(MLP(LN(x))). `bias` is an optional additive attention mask.

    Args:
        layer_scale: initial LayerScale gain (None: no LayerScale, the branches add as they are).
        norm_eps: epsilon of both LayerNorms.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        layer_scale: float | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), bias))  # (B, L, D)
        return x + self.ls2(self.mlp(self.norm2(x)))  # (B, L, D)


class Transformer(nn.Module):
    """A stack of `depth` blocks followed by a final LayerNorm. x: (B, L, D) -> (B, L, D).

    Args:
        dim: width D.
        depth: number of blocks (0 gives just the final norm).
        heads: attention heads (D divisible by heads).
        mlp_ratio: MLP hidden width as a multiple of D.
        qk_norm: RMS-normalise queries and keys (stabilises large widths).
        layer_scale: initial LayerScale gain of every block (None: no LayerScale).
        norm_eps: epsilon of every LayerNorm, the final one included.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        layer_scale: float | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        kw = {"mlp_ratio": mlp_ratio, "qk_norm": qk_norm, "layer_scale": layer_scale, "norm_eps": norm_eps}
        self.blocks = nn.ModuleList(Block(dim, heads, **kw) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, bias)  # (B, L, D)
        return self.norm(x)
