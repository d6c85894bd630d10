"""MergePattern: the one representation of a global token pattern, for every K of a grid.

Letters: B batch, N latent slots, K tokens, C channels.

A pattern at level K assigns each of the N slots to one of K tokens, or to none. It is stored as an
index vector `assign` (N,) with values in [-1, K), -1 meaning "this slot carries no token". From it:
    Gamma (N, K) one-hot (a zero row for a dropped slot), sizes m = Gamma^T 1 (K,),
    Gbar = Gamma diag(1/m) (column means),
    merge:   z~ = Gbar^T z                        (B, K, C), the token of each group,
    unmerge: z^ = Gamma z~ + (1 - Gamma 1) f^T   (B, N, C), each slot gets its token back and a
                                                   dropped slot gets the fill vector f (C,).
Every global scheme the stages share is such a pattern:
    learned global merging (LGM): nested average-linkage cuts, every slot in some group;
    nested dropout: slot i < K is token i (size 1), the other N - K slots are dropped (fill = the
        tokenizer's mask vector);
    fixed K: an LGM pattern of one level; identity: K = N.
Because everything downstream (merged positions Gbar^T p, pooled noise Gbar^T eps, the log m_j
attention bias, the m_j K / sum(m) loss weights) is written in Gamma and Gbar, stage 2 never has to
know which scheme made the pattern. Per-image patterns (ToMe) are not patterns: a generator cannot
know them at sampling time.

The pattern is an nn.Module whose assignments are buffers, so it travels inside state dicts
(checkpoints, exports); `to_dict`/`save` write the same data as readable JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from vlt.models.merge_ops import column_normalise, merge, one_hot, unmerge

PatternKind = Literal["lgm", "nested", "fixed", "identity", "contiguous"]
PATTERN_KINDS: tuple[str, ...] = get_args(PatternKind)


def _check_assign(n: int, k: int, assign: Tensor) -> None:
    """Every level must be a map of the N slots onto exactly K tokens (-1: slot dropped)."""
    used = assign[assign >= 0]
    if assign.shape != (n,) or int(assign.min()) < -1 or int(assign.max()) >= k or used.unique().numel() != k:
        raise ValueError(f"pattern level K={k} is not a map of {n} slots onto {k} tokens")


class MergePattern(nn.Module):
    """Assignments (N,) for every K of `ks` as buffers `assign_<K>`; see the module docstring.

    Args:
        n: N, slots of the full latent.
        assign: {K: (N,) long in [-1, K)}.
        kind: which scheme made it (metadata for messages and exports; the maths never reads it).
    """

    def __init__(self, n: int, assign: Mapping[int, Tensor], *, kind: PatternKind = "lgm") -> None:
        super().__init__()
        if kind not in PATTERN_KINDS:
            raise ValueError(f"unknown pattern kind {kind!r}; choose one of {PATTERN_KINDS}")
        if not assign:
            raise ValueError("a pattern needs at least one level K")
        self.n, self.kind = int(n), kind
        self.ks: list[int] = sorted(int(k) for k in assign)
        for k in self.ks:
            a = torch.as_tensor(assign[k]).long().clone()
            _check_assign(self.n, k, a)
            self.register_buffer(f"assign_{k}", a)

    # --- constructors of the global schemes ---
    @classmethod
    def contiguous(cls, n: int, ks: Iterable[int], *, kind: PatternKind = "contiguous") -> MergePattern:
        """Contiguous equal groups (nested when each K divides the next); also the shape-only
        placeholder a module is built with before real values load from a state dict."""
        return cls(n, {int(k): torch.arange(n) * int(k) // n for k in ks}, kind=kind)

    @classmethod
    def truncation(cls, n: int, ks: Iterable[int]) -> MergePattern:
        """Nested dropout: the first K slots are the tokens, the rest are dropped."""
        ar = torch.arange(n)
        return cls(n, {int(k): torch.where(ar < int(k), ar, -1) for k in ks}, kind="nested")

    @classmethod
    def identity(cls, n: int) -> MergePattern:
        return cls(n, {n: torch.arange(n)}, kind="identity")

    # --- the matrices of one level ---
    def assignment(self, k: int) -> Tensor:
        """(N,) long in [-1, K)."""
        if k not in self.ks:
            raise ValueError(f"K={k} is not a level of this {self.kind} pattern; choose one of {self.ks}")
        return getattr(self, f"assign_{k}")

    def gamma(self, k: int) -> Tensor:
        """(N, K) float one-hot; dropped slots have a zero row."""
        a = self.assignment(k)
        return one_hot(a.clamp_min(0), k) * (a >= 0).float()[:, None]

    def gbar(self, k: int) -> Tensor:
        """(N, K) column-normalised Gamma: merge takes group means."""
        return column_normalise(self.gamma(k))

    def sizes(self, k: int) -> Tensor:
        """(K,) float slots per token (ones for nested dropout)."""
        return self.gamma(k).sum(0)

    def kept(self, k: int) -> Tensor:
        """(N,) bool: slots that belong to a token at level K."""
        return self.assignment(k) >= 0

    def merge(self, z: Tensor, k: int) -> Tensor:
        """z (B, N, C) -> tokens (B, K, C)."""
        return merge(z, self.gbar(k).to(z.device))

    def unmerge(self, tokens: Tensor, fill: Tensor | None = None) -> Tensor:
        """tokens (B, K, C) -> (B, N, C); dropped slots get `fill` (C,) (zeros if None)."""
        k = tokens.shape[1]
        gamma = self.gamma(k).to(tokens)  # (N, K)
        z = unmerge(tokens, gamma)  # (B, N, C)
        dropped = 1.0 - gamma.sum(1, keepdim=True)  # (N, 1)
        if fill is None or not bool(dropped.any()):
            return z
        return z + dropped * fill.to(tokens)  # (B, N, C)

    def nested(self) -> bool:
        """True when every coarser level is a union of groups of every finer level."""
        for small, big in pairwise(self.ks):
            fine, coarse = self.assignment(big), self.assignment(small)
            both = (fine >= 0) & (coarse >= 0)
            if bool(((coarse >= 0) & ~(fine >= 0)).any()):
                return False  # a slot appears at the coarse level but not the fine one
            pairs = torch.unique(torch.stack([fine[both], coarse[both]]), dim=1)
            if pairs.shape[1] != int(fine[both].unique().numel()):
                return False
        return True

    def equal(self, other: MergePattern) -> bool:
        """Same N, same levels, same assignments (the kind is metadata)."""
        return (
            self.n == other.n
            and self.ks == other.ks
            and all(torch.equal(self.assignment(k).cpu(), other.assignment(k).cpu()) for k in self.ks)
        )

    def subset(self, ks: Iterable[int]) -> MergePattern:
        """The same pattern restricted to the levels `ks`."""
        return MergePattern(self.n, {int(k): self.assignment(int(k)).cpu() for k in ks}, kind=self.kind)

    # --- persistence: readable JSON beside checkpoints, caches and exports ---
    def to_dict(self) -> dict:
        assign = {str(k): self.assignment(k).tolist() for k in self.ks}
        return {"n": self.n, "kind": self.kind, "assign": assign}

    @classmethod
    def from_dict(cls, d: Mapping) -> MergePattern:
        assign = {int(k): torch.tensor(v) for k, v in d["assign"].items()}
        return cls(int(d["n"]), assign, kind=d.get("kind", "lgm"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MergePattern:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no merge pattern at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def extra_repr(self) -> str:
        return f"n={self.n}, kind={self.kind}, ks={self.ks}"
