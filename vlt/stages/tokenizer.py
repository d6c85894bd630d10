"""Stage 1's inference contract: a variable-length tokenizer = encoder + decoder + one MergePattern.

Letters: B batch, N latent slots, K tokens, C channels, H/W height/width.

    tok = vlt.load("exports/tokenizer-tiny")          # or a stage-1 checkpoint
    z = tok.encode(images)                             # (B, N, C) full slot latents
    t = tok.tokenize(images, k=8)                      # Tokens(tokens (B, 8, C), sizes (8,))
    images = tok.detokenize(t.tokens)                  # unmerge through the global pattern, decode
    tok.reconstruct(images, k=8), tok.flops("reconstruct")

Pure torch: training (merge embeddings, exploration noise, straight-through assignment) lives in
`vlt.models.merging.Merger` and `vlt.lit.LitTokenizer`, which hand over a frozen snapshot of
this object. Per-image ToMe tokenizers have no global pattern (`pattern=None`): they tokenize and
reconstruct, but tokens alone cannot be decoded (the pattern depends on the image).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from vlt.models.baselines import bipartite_assignment
from vlt.models.merge_ops import column_normalise, merge, unmerge
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import Tokenizer, TokenizerConfig

TokenizerTask = Literal["encode", "decode", "reconstruct"]


class Tokens(NamedTuple):
    tokens: Tensor  # (B, K, C)
    sizes: Tensor  # (K,) for a global pattern, (B, K) per image (ToMe): slots per token


class VariableLengthTokenizer(nn.Module):
    """Images <-> N slot latents <-> K tokens of a global pattern.

    Args:
        cfg: the network's config.
        pattern: the global pattern (None: per-image ToMe merging).
        fill: the vector a dropped slot is decoded with (nested dropout's mask); zeros if None.
    """

    def __init__(
        self, cfg: TokenizerConfig, pattern: MergePattern | None, fill: Tensor | None = None
    ) -> None:
        super().__init__()
        if pattern is not None and pattern.n != cfg.n_slots:
            raise ValueError(f"pattern over {pattern.n} slots for a tokenizer with N={cfg.n_slots}")
        self.net = Tokenizer(cfg)
        self.pattern = pattern
        self.register_buffer("fill", torch.zeros(cfg.channels) if fill is None else fill.detach().clone())

    @property
    def cfg(self) -> TokenizerConfig:
        return self.net.cfg

    @property
    def ks(self) -> list[int]:
        """Levels of the global pattern ([] for per-image merging)."""
        return self.pattern.ks if self.pattern is not None else []

    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> z (B, N, C) (the posterior mean for KL bottlenecks in eval)."""
        return self.net.encode(images).z

    def tokenize(self, images: Tensor, k: int) -> Tokens:
        """images -> K tokens and their sizes."""
        return self.merge(self.encode(images), k)

    def merge(self, z: Tensor, k: int) -> Tokens:
        """z (B, N, C) -> K tokens (K = N is the identity at every pattern)."""
        n = z.shape[1]
        if k == n:
            return Tokens(z, z.new_ones(n))
        if self.pattern is None:
            gamma = bipartite_assignment(z, k).to(z.dtype)  # (B, N, K)
            return Tokens(merge(z, column_normalise(gamma)), gamma.sum(1))
        return Tokens(self.pattern.merge(z, k), self.pattern.sizes(k).to(z))

    def unmerge(self, tokens: Tensor) -> Tensor:
        """tokens (B, K, C) -> z_hat (B, N, C) through the global pattern."""
        if tokens.shape[1] == self.cfg.n_slots:
            return tokens
        if self.pattern is None:
            raise ValueError("per-image (ToMe) tokens cannot be decoded without their image: use reconstruct")
        return self.pattern.unmerge(tokens, self.fill)

    def detokenize(self, tokens: Tensor) -> Tensor:
        """tokens (B, K, C) -> images (B, 3, H, W), roughly in [-1, 1]."""
        return self.net.decode(self.unmerge(tokens))

    def reconstruct(self, images: Tensor, k: int) -> Tensor:
        """images -> K tokens -> images (B, 3, H, W)."""
        z = self.encode(images)
        if self.pattern is None and k < z.shape[1]:
            gamma = bipartite_assignment(z, k).to(z.dtype)  # (B, N, K)
            return self.net.decode(unmerge(merge(z, column_normalise(gamma)), gamma))
        return self.detokenize(self.merge(z, k).tokens)

    def flops(self, task: TokenizerTask = "reconstruct") -> int:
        """Forward FLOPs per image. The decoder always sees N slots, so they do not fall with K."""
        if task == "reconstruct":
            return self.net.flops("encode") + self.net.flops("decode")
        return self.net.flops(task)
