"""Merge and unmerge as pure tensor functions, and the merge table shared by every stage.

Letters: B batch, N latent slots, K merged tokens, C channels.

A merge pattern for one K is a hard assignment of each of the N slots to one of K clusters, stored as
an index vector `assign` (N,) with values in [0, K). From it:
    Gamma (N, K) one-hot, sizes m = Gamma^T 1 (K,), Gbar = Gamma diag(1/m) (column means).
    merge:   z~ = Gbar^T z   (B, K, C), the cluster means.
    unmerge: z^ = Gamma z~   (B, N, C), each slot gets its cluster's mean back.
The table is global (the same for every image), so it is data, not a module: it is saved beside
checkpoints and latent caches and loaded on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

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


@dataclass
class MergeTable:
    """The fixed global merge pattern: an assignment (N,) for every K of the grid.

    `assign[k][i]` is the cluster of slot i at level K=k. For learned merging the cuts are nested
    (each K's clusters are unions of the next larger K's clusters); `nested()` checks it.
    """

    n: int
    assign: dict[int, Tensor]

    def __post_init__(self) -> None:
        for k, a in self.assign.items():
            if a.shape != (self.n,) or a.min() < 0 or a.max() >= k or a.unique().numel() != k:
                raise ValueError(f"merge table entry K={k} is not an onto map of {self.n} slots to {k}")

    @property
    def ks(self) -> list[int]:
        return sorted(self.assign)

    def gamma(self, k: int) -> Tensor:
        """(N, K) one-hot assignment."""
        return one_hot(self._get(k), k)

    def sizes(self, k: int) -> Tensor:
        """(K,) slots per merged token, summing to N."""
        return torch.bincount(self._get(k), minlength=k).float()

    def gbar(self, k: int) -> Tensor:
        """(N, K) column-normalised assignment (cluster means)."""
        return column_normalise(self.gamma(k))

    def merge(self, z: Tensor, k: int) -> Tensor:
        return merge(z, self.gbar(k).to(z.device))

    def unmerge(self, zt: Tensor) -> Tensor:
        return unmerge(zt, self.gamma(zt.shape[1]).to(zt.device))

    def nested(self) -> bool:
        """True when every coarser cut is a union of clusters of every finer cut."""
        ks = self.ks
        for small, big in pairwise(ks):
            fine, coarse = self.assign[big], self.assign[small]
            # Each fine cluster must map into exactly one coarse cluster.
            pairs = torch.unique(torch.stack([fine, coarse]), dim=1)
            if pairs.shape[1] != big:
                return False
        return True

    def _get(self, k: int) -> Tensor:
        if k not in self.assign:
            raise KeyError(f"K={k} is not in the merge table (grid {self.ks}); choose one of those")
        return self.assign[k]

    # --- persistence: JSON so the table is readable and loadable without torch pickles ---
    def to_dict(self) -> dict:
        return {"n": self.n, "assign": {str(k): a.tolist() for k, a in sorted(self.assign.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> MergeTable:
        return cls(n=int(d["n"]), assign={int(k): torch.tensor(v) for k, v in d["assign"].items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> MergeTable:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def contiguous(cls, n: int, ks: Iterable[int]) -> MergeTable:
        """A nested table of contiguous equal groups (a fixed pattern for tests and baselines)."""
        return cls(n=n, assign={k: torch.arange(n) * k // n for k in ks})
