"""Merge and unmerge as pure tensor functions (the maths of `vlt.models.pattern.MergePattern`).

Letters: B batch, N latent slots, K merged tokens, C channels.

A merge pattern for one K is a hard assignment of each of the N slots to one of K clusters, stored as
an index vector `assign` (N,) with values in [0, K). From it:
    Gamma (N, K) one-hot, sizes m = Gamma^T 1 (K,), Gbar = Gamma diag(1/m) (column means).
    merge:   z~ = Gbar^T z   (B, K, C), the cluster means.
    unmerge: z^ = Gamma z~   (B, N, C), each slot gets its cluster's mean back.
The same functions serve per-image patterns (a leading batch dimension on Gamma / Gbar).
"""

from __future__ import annotations

import torch
from torch import Tensor


def one_hot(assign: Tensor, k: int) -> Tensor:
    """Gamma (N, K) float one-hot from an assignment (N,) with values in [0, K)."""
    return torch.nn.functional.one_hot(assign.long(), k).float()


def column_normalise(gamma: Tensor) -> Tensor:
    """Gbar = Gamma diag(1/m): each column sums to one (works for soft/straight-through Gamma too)."""
    return gamma / gamma.sum(dim=-2, keepdim=True).clamp_min(1e-12)


def merge(z: Tensor, gbar: Tensor) -> Tensor:
    """Cluster means. z: (B, N, C), gbar: (N, K) or (B, N, K) column-normalised -> (B, K, C)."""
    if gbar.ndim == 2:
        return torch.einsum("nk,bnc->bkc", gbar.to(z.dtype), z)
    return torch.einsum("bnk,bnc->bkc", gbar.to(z.dtype), z)


def unmerge(zt: Tensor, gamma: Tensor) -> Tensor:
    """Broadcast back. zt: (B, K, C), gamma: (N, K) or (B, N, K) -> (B, N, C)."""
    if gamma.ndim == 2:
        return torch.einsum("nk,bkc->bnc", gamma.to(zt.dtype), zt)
    return torch.einsum("bnk,bkc->bnc", gamma.to(zt.dtype), zt)
