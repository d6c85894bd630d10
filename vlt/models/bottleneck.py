"""Latent bottlenecks: encoder slot features (B, N, D) -> latents z (B, N, C) plus a KL term.

Letters: B batch, N slots, C latent channels, D encoder width.

Three choices:
- "kl": a diagonal Gaussian (mean, log-variance) with the KL to N(0, I), as in the paper's recipe
  (weight ~1e-6). Sampling happens only in training and only if `sample` is on.
- "layernorm": a linear projection then a LayerNorm over C without affine parameters. On tiny CPU
  runs it trains where the KL recipe collapsed, and it fixes the latent scale for the DiT.
- "softvq": SoftVQ (the paper's choice and the released tokenizer's): a linear projection to C, then
  each slot, L2-normalised, becomes a softmax-weighted mean of unit codebook vectors. The N slots are
  split into G contiguous groups and group g reads codebook g (the reference: G = 4 codebooks of 8192
  entries for N = 256). Deterministic; its training regulariser is the codebook-entropy loss.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

BottleneckKind = Literal["kl", "layernorm", "softvq"]
BOTTLENECKS: tuple[str, ...] = ("kl", "layernorm", "softvq")


class BottleneckOut(NamedTuple):
    z: Tensor  # (B, N, C) latent used downstream: a sample in KL training, else the mean
    mean: Tensor  # (B, N, C) the deterministic latent (for caching)
    # () the regulariser the objective weights with `kl`: the KL per image for "kl" (summed over N and
    # C, averaged over B), the codebook-entropy loss for "softvq" (in training, else 0), 0 for "layernorm"
    kl: Tensor


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


class SoftVQBottleneck(nn.Module):
    """Soft vector quantisation over G codebooks of V unit vectors (SoftVQ-VAE, as the reference runs it).

    z = normalize(proj(h)) (B, N, C); slots [g N/G, (g+1) N/G) read codebook g: p = softmax(z . e / tau)
    over its V entries (e L2-normalised), z_q = p e, a convex mix of unit vectors. The codebook gets no
    gradient through the logits (they use sg(e)), only through the mix.

    Args:
        width: D.
        channels: C, also the codebook vectors' width.
        codebooks: G (N must be a multiple of it).
        codebook_size: V entries per codebook.
        tau: softmax temperature (the released tokenizer: 0.07).
        entropy_temperature: temperature of the entropy regulariser's own softmax (the reference: 0.01).
    """

    def __init__(
        self,
        width: int,
        channels: int,
        *,
        codebooks: int = 4,
        codebook_size: int = 8192,
        tau: float = 0.07,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(width, channels)
        self.codebook = nn.Parameter(F.normalize(torch.randn(codebooks, codebook_size, channels), dim=-1))
        self.tau, self.entropy_temperature = tau, entropy_temperature

    def forward(self, h: Tensor) -> BottleneckOut:
        g = self.codebook.shape[0]
        if h.shape[1] % g:
            raise ValueError(f"{h.shape[1]} slots do not split into {g} codebook groups")
        z = F.normalize(self.proj(h), dim=-1)  # (B, N, C)
        zg = rearrange(z, "b (g n) c -> g (b n) c", g=g)  # (G, B N/G, C)
        books = F.normalize(self.codebook, dim=-1)  # (G, V, C)
        logits = zg @ books.detach().transpose(1, 2)  # (G, B N/G, V)
        zq = torch.softmax(logits / self.tau, dim=-1) @ books  # (G, B N/G, C)
        zq = rearrange(zq, "g (b n) c -> b (g n) c", b=h.shape[0])  # (B, N, C)
        reg = codebook_entropy(logits, self.entropy_temperature) if self.training else zq.new_zeros(())
        return BottleneckOut(z=zq, mean=zq, kl=reg)


def codebook_entropy(logits: Tensor, temperature: float) -> Tensor:
    """Mean per-slot entropy minus the entropy of the mean assignment, over every slot of every
    codebook (logits (..., V) -> ()): low when each slot picks few entries and all entries get used."""
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]) / temperature, dim=-1)  # (M, V)
    log_probs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]) / temperature, dim=-1)
    mean = probs.mean(0)  # (V,)
    return -(probs * log_probs).sum(-1).mean() + (mean * torch.log(mean + 1e-6)).sum()


def make_bottleneck(
    kind: BottleneckKind,
    *,
    width: int,
    channels: int,
    sample: bool = True,
    codebooks: int = 4,
    codebook_size: int = 8192,
    tau: float = 0.07,
) -> nn.Module:
    """Build a bottleneck by name; `sample` only matters for "kl", the codebook knobs for "softvq"."""
    if kind == "kl":
        return KLBottleneck(width, channels, sample=sample)
    if kind == "layernorm":
        return LayerNormBottleneck(width, channels)
    if kind == "softvq":
        return SoftVQBottleneck(width, channels, codebooks=codebooks, codebook_size=codebook_size, tau=tau)
    raise ValueError(f"unknown bottleneck {kind!r}; choose one of {BOTTLENECKS}")
