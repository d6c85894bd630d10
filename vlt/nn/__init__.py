"""Reusable blocks (pure torch): attention with a proportional-attention bias, MLPs, norms, pos-emb."""

from vlt.nn.attention import Attention, size_bias

__all__ = ["Attention", "size_bias"]
