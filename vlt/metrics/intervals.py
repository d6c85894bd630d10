"""Intervals for compared numbers: a Student-t interval over seeds and a bootstrap over samples.

Letters: R bootstrap replicates, S seeds.

`Estimate` is what every budget evaluation reports: a mean and the half-width of a two-sided
interval at `confidence`, printed as `mean ± half`. Two sources of spread:
  * seeds: S independent evaluations (other noise seeds, other image draws); the t interval covers
    the expected value of the metric at this sample size.
  * bootstrap: one evaluation, R resamples of its samples with replacement; the normal interval
    (point ± z * replicate std) covers the same expectation when the statistic is smooth.
Several seeds each with a bootstrap combine as the mean over seeds, with the t interval over seeds
when S > 1 (it includes the sampling noise the bootstraps estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A mean and the half-width of its interval; `n` seeds or replicates it came from."""

    mean: float
    half: float
    n: int = 1
    method: str = "none"

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    def covers(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def __format__(self, spec: str) -> str:
        spec = spec or ".3g"
        return f"{self.mean:{spec}} ± {self.half:{spec}}"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean of S >= 2 values and the half-width t_{S-1} * std / sqrt(S)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(x)}")
    q = scipy.stats.t.ppf(0.5 + confidence / 2, df=len(x) - 1)
    return Estimate(float(x.mean()), float(q * x.std(ddof=1) / math.sqrt(len(x))), len(x), "seeds")


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean a - mean b, its Welch half-width at `confidence`, two-sided Welch p) of two sets of seeds.

    Constant values on both sides (e.g. a saturated accuracy) leave no spread to test against: the
    half-width is 0 and p is 1 for equal means, else 0.
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Welch's test needs at least 2 values a side, got {len(x)} and {len(y)}")
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    d = float(x.mean() - y.mean())
    if va + vb == 0:
        return d, 0.0, 1.0 if d == 0 else 0.0
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    p = float(scipy.stats.ttest_ind(x, y, equal_var=False).pvalue)
    return d, float(scipy.stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb)), p


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean of a_i - b_i, its t half-width at `confidence`, two-sided paired-t p) of matched seeds.

    For two systems evaluated on the same seeds (common random numbers: the same noise, labels and
    reference images for seed i on both sides), the noise both share cancels in a_i - b_i; Welch's test
    would count it twice. Constant differences leave no spread: half-width 0, p 1 when they are 0, else 0.
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"a paired test needs two equal sets of at least 2 values, got {len(x)} and {len(y)}"
        )
    diff = x - y
    if np.ptp(diff) == 0:
        return float(diff.mean()), 0.0, 1.0 if diff[0] == 0 else 0.0
    e = t_interval(diff, confidence)
    return e.mean, e.half, float(scipy.stats.ttest_rel(x, y).pvalue)


def bootstrap(
    statistic: Callable[[Tensor, Tensor], Mapping[str, float]],
    n_real: int,
    n_fake: int,
    *,
    replicates: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    resample_real: bool = False,
) -> dict[str, Estimate]:
    """Normal bootstrap intervals of every value `statistic(real_index, fake_index)` returns.

    The point estimate is the statistic on all samples (identity indices); each replicate resamples
    the generated side with replacement (and the real side when `resample_real`, e.g. when both sets
    are samples rather than a fixed reference). Half-width = z * std over replicates.
    """
    generator = torch.Generator().manual_seed(seed)
    real_all, fake_all = torch.arange(n_real), torch.arange(n_fake)
    point = dict(statistic(real_all, fake_all))
    draws: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(replicates):
        fake = torch.randint(0, n_fake, (n_fake,), generator=generator)
        real = torch.randint(0, n_real, (n_real,), generator=generator) if resample_real else real_all
        for name, value in statistic(real, fake).items():
            draws[name].append(value)
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    spread = lambda name: float(np.std(draws[name], ddof=1)) if replicates > 1 else float("nan")
    return {name: Estimate(float(v), z * spread(name), replicates, "bootstrap") for name, v in point.items()}


def combine(per_seed: Sequence[Mapping[str, Estimate]], confidence: float = 0.95) -> dict[str, Estimate]:
    """One estimate per name from S evaluations: itself for S = 1, else the t interval over seeds."""
    if len(per_seed) == 1:
        return dict(per_seed[0])
    out = {}
    for name, first in per_seed[0].items():
        values = [e[name].mean for e in per_seed]
        if first.method == "subsets":  # a spread itself (KID's subset std): averaged, no interval
            out[name] = Estimate(float(np.mean(values)), 0.0, len(values), "subsets")
        else:
            out[name] = t_interval(values, confidence)
    return out
