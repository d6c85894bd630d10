"""Pre-norm ViT blocks: the encoder and decoder stacks of the 1D tokenizer.

Letters: B batch, L sequence length (patches plus slots), D width.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlt.nn.attention import Attention
from vlt.nn.mlp import Mlp


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)). `bias` is an optional additive attention mask."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), bias)  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


class Transformer(nn.Module):
    """A stack of `depth` blocks followed by a final LayerNorm. x: (B, L, D) -> (B, L, D).

    Args:
        dim: width D.
        depth: number of blocks (0 gives just the final norm).
        heads: attention heads (D divisible by heads).
        mlp_ratio: MLP hidden width as a multiple of D.
        qk_norm: RMS-normalise queries and keys (stabilises large widths).
    """

    def __init__(
        self, dim: int, depth: int, heads: int, *, mlp_ratio: float = 4.0, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, bias)  # (B, L, D)
        return self.norm(x)
