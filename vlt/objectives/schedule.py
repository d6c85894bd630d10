"""Coarse-to-fine sampling: a token count K that grows over sampling time along the nested cuts.

Letters: B batch, N latent slots, K tokens (Ka coarse, Kb fine), C channels, S sampler steps.

A `KSchedule` lists phases (t_start, K): from flow time t_start on (0 noise, 1 data) the sampler
integrates at K tokens. High-noise steps only shape the coarse layout, so they can run on a few
merged tokens; the detail comes in late steps at the full K. On the sampler's time grid a step
[t_i, t_i+1) runs at the K of the last phase that has started by t_i (`ks_per_step`).

Splitting a state at time t from level Ka to a finer nested level Kb (`split_tokens`). A token's state
is x_j = t z~_j + (1 - t) e_j with the cluster mean z~_j of the data and the pooled noise
e_j = mean_{i in j} eps_i, eps ~ N(0, I_N) (variance 1/m_j). With P = Gamma_a Gbar_a^T, the (N, N)
projector onto slot vectors that are constant on each coarse group (zero on dropped slots):

    x_b = Gbar_b^T [ Gamma_a x_a + r (I - P) eps' ],   eps' ~ N(0, I_N) fresh,
    r = sqrt((1 - t)^2 + (t sigma)^2).

With sigma = 0 the fresh part is the missing noise alone (below); sigma > 0 adds the missing data.

Noise: the split state's noise is Gbar_b^T [P eps + (I - P) eps']. P is symmetric and idempotent and
eps, eps' are independent, so P eps + (I - P) eps' ~ N(0, P + (I - P)) = N(0, I_N): the children
carry exactly the fine level's pooled noise, variance 1/m_l each, correlated as pooled noise is. And
merging the children back gives the parent exactly (the cuts are nested: Gbar_a^T Gamma_b Gbar_b^T =
Gbar_a^T, and Gbar_a^T (I - P) = 0), so a split never moves the coarse state.

Data (`FlowSpec.split_detail` = sigma). The fine state also holds t (I - P) x1, the data's detail below
the coarse cut, which the coarse state does not know. Left out (sigma = 0), every child starts at its
parent's cluster mean (a slot dropped at Ka, as in nested dropout, at 0, the mean of the normalised
latents): the state then has too little variance in the detail directions, and the ODE, which moves
states without adding variance, turns it into samples short of detail (measured: gfd_vltnet 3.85 at
K = 32 after a split at t = 0.3, against 2.95 without a split). With sigma = 1 the unknown detail is
drawn from the normalised latents' own prior, N(0, I_N) restricted to the detail directions, as the
sum t sigma (I - P) xi with fresh xi; added to the missing noise it is the single draw r (I - P) eps'.
The state then has the fine level's second moments when the detail is white with the latents' unit
variance (on the tiny tokenizer its variance is 0.7-1.1 times that), and the sampler fills in detail
the model finds plausible (2.54-2.58 at 0.8-1.0 of the FLOPs).

Training for splits (`FlowSpec.split_prob`, `split_path`). A plain rectified-flow velocity x1 - eps
cannot bring that detail back: integrating it from a split at time s leaves the final sample short
by s (x1 - Px1), the missing detail scaled by the split time. The velocity that does reach the data
is the straight line from the current state to it, v = (x1 - x_t) / (1 - t), which equals x1 - eps on
ordinary flow states. After a split at s and the straight line since, the state and that target are

    x_t = t x1 + (1 - t) eps - c (x1 - Px1),   c = s (1 - t) / (1 - s),
    v   = x1 - eps + s / (1 - s) (x1 - Px1),

with Px1 the parents' means at the fine level; s = 0 is ordinary flow matching. A DiT trained on a
share of such states (s drawn below t) learns to add the detail a split left out; with sigma > 0 the
drawn detail d' is part of the split state, and the formulas hold with Px1 replaced by Px1 + d'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from vlt.models.merge_ops import merge, unmerge

EXAMPLE = "4,8@0.3,16@0.5,32@0.7"
_EPS = 1e-9  # a phase starting at t_start is on at grid time t_i when t_i >= t_start - _EPS


@dataclass(frozen=True)
class KSchedule:
    """Phases ((t_start, K), ...): t_start strictly ascending from 0 in [0, 1), K strictly ascending.

    Written on the command line as "4,8@0.3,16@0.5,32@0.7": K = 4 from t = 0, 8 from t = 0.3, ...
    """

    phases: tuple[tuple[float, int], ...]

    def __post_init__(self) -> None:
        phases = tuple((float(t), int(k)) for t, k in self.phases)
        object.__setattr__(self, "phases", phases)
        starts, ks = [t for t, _ in phases], [k for _, k in phases]
        if not phases or starts[0] != 0.0:
            raise ValueError(f"a K schedule starts at t = 0, got phases {list(phases)}")
        ascending = all(a < b for a, b in pairwise(starts)) and all(a < b for a, b in pairwise(ks))
        if not ascending or starts[-1] >= 1.0 or ks[0] < 1:
            raise ValueError(
                f"K schedule {self}: start times must ascend within [0, 1) and K must grow at every phase"
            )

    @classmethod
    def constant(cls, k: int) -> KSchedule:
        return cls(((0.0, int(k)),))

    @classmethod
    def parse(cls, text: str) -> KSchedule:
        """ "4,8@0.3,32@0.7" -> phases (0, 4), (0.3, 8), (0.7, 32); a bare first K starts at 0."""
        phases = []
        try:
            for i, part in enumerate(p.strip() for p in text.split(",")):
                k, _, t = part.partition("@")
                phases.append((float(t) if t else (0.0 if i == 0 else float("nan")), int(k)))
        except ValueError:
            raise ValueError(f"cannot read K schedule {text!r}; write it as e.g. {EXAMPLE!r}") from None
        if any(t != t for t, _ in phases):
            raise ValueError(
                f"K schedule {text!r}: each phase after the first needs @<time>, e.g. {EXAMPLE!r}"
            )
        return cls(tuple(phases))

    def __str__(self) -> str:
        return ",".join(f"{k}" if t == 0 else f"{k}@{t:g}" for t, k in self.phases)

    @property
    def ks(self) -> list[int]:
        return [k for _, k in self.phases]

    @property
    def final_k(self) -> int:
        return self.phases[-1][1]

    def capped(self, k: int) -> KSchedule:
        """The schedule with every K above `k` replaced by `k` (phases that stop growing are dropped)."""
        phases: list[tuple[float, int]] = []
        for t, kk in self.phases:
            kk = min(kk, int(k))
            if not phases or kk > phases[-1][1]:
                phases.append((t, kk))
        return KSchedule(tuple(phases))

    def ks_per_step(self, grid: Sequence[float]) -> list[int]:
        """K of each of the S steps of a time grid of S + 1 points. A phase that no step starts in is
        skipped (the split goes straight to the next K), but the last one must get a step."""
        ks = [next(k for start, k in reversed(self.phases) if t >= start - _EPS) for t in grid[:-1]]
        if ks[-1] != self.final_k:
            raise ValueError(
                f"K schedule {self}: no step of the {len(ks)}-step grid starts at or after "
                f"t={self.phases[-1][0]:g} (the last starts at t={grid[-2]:.3g}), so K={self.final_k} is "
                "never reached: start the last phase earlier or sample with more steps"
            )
        return ks


def split_tokens(
    x: Tensor, t: float, gbar_a: Tensor, gbar_b: Tensor, eps: Tensor, detail: float = 1.0
) -> Tensor:
    """Coarse state x (B, Ka, C) at flow time t -> fine state (B, Kb, C) (see the module docstring).

    gbar_a, gbar_b: (N, Ka), (N, Kb) column-normalised assignments of the coarse level (zero rows
    for dropped slots) and of a finer nested level; eps: (B, N, C) fresh N(0, 1) noise;
    detail: sigma, the prior std of the unknown data detail (0: children start at the parent's mean).
    """
    spread = ((1.0 - t) ** 2 + (t * detail) ** 2) ** 0.5  # r: the missing noise and the missing data
    detail = orthogonal_part(eps.to(x), gbar_a)  # (B, N, C): (I - P) eps
    return merge(unmerge(x, (gbar_a > 0).to(x)) + spread * detail, gbar_b)  # (B, Kb, C)


def split_path(x1: Tensor, parent: Tensor, eps: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Training state x_t and velocity target (B, K, C) of a sampler that split its tokens at time s.

    x1: (B, K, C) clean fine tokens; parent: (B, K, C) their parents' means at the fine level (Px1);
    eps: (B, K, C) pooled noise; t, s: (B,) flow times with 0 <= s <= t < 1 (s = 0: no split).
    See the module docstring for the derivation.
    """
    t, s = t[:, None, None].to(x1), s[:, None, None].to(x1)
    detail = x1 - parent  # (B, K, C)
    x_t = t * x1 + (1 - t) * eps - s * (1 - t) / (1 - s) * detail
    return x_t, x1 - eps + s / (1 - s) * detail


def orthogonal_part(v: Tensor, gbar_a: Tensor) -> Tensor:
    """(I - P) v for v (B, N, C): what a coarse level (column-normalised gbar_a (N, Ka)) does not see."""
    return v - unmerge(merge(v, gbar_a), (gbar_a > 0).to(v))  # Gamma_a = the support of Gbar_a


def draw_split_noise(
    b: int, n: int, c: int, count: int, generator: torch.Generator | None, device: torch.device
) -> list[Tensor]:
    """`count` fresh full-space noises (B, N, C), one per split, drawn in order from `generator`."""
    device = generator.device if generator is not None else device
    return [torch.randn(b, n, c, generator=generator, device=device) for _ in range(count)]
