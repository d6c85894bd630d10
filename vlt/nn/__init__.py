"""Reusable blocks (pure torch): attention with a proportional-attention bias, MLPs, pos-emb."""

from vlt.nn.attention import Attention, size_bias
from vlt.nn.mlp import Mlp, SwiGLU
from vlt.nn.posemb import sincos_2d

__all__ = ["Attention", "Mlp", "SwiGLU", "sincos_2d", "size_bias"]
