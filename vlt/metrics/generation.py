"""The generation-evaluation protocol of the ADM suite on extracted features: FID, sFID, IS, P/R, KID.

Letters: N reference images, M generated samples, F pool features, S spatial features, L logits.

The protocol is the one of the ADM evaluation suite (Dhariwal & Nichol 2021, guided-diffusion's
evaluations/evaluator.py), computed with the project's scores (`vlt.metrics.scores`):
  * fid: Fréchet distance of pool features (Inception: 2048-d). The reference side is a mean and a
    covariance, from its images or precomputed (an ADM reference batch's `mu`, `sigma`).
  * sfid: the same on spatial features (Inception: the first 7 channels of mixed_6/conv, 17x17x7
    flattened; `mu_s`, `sigma_s` in a reference batch).
  * is: Inception Score, exp E_x KL(p(y|x) || p(y)) on the softmax of the unbiased logits, in splits
    of 5000 samples, mean over splits.
  * precision / recall: Kynkaanniemi et al. k-NN manifolds, k = 3, on pool features.
  * kid: not in the ADM suite; unbiased MMD^2 with the cubic kernel (Binkowski et al. 2018).
With another extractor than Inception the names carry it (`fd_vltnet`, `kid_vltnet`, ...) and sFID
and IS are reported unavailable: they are defined by Inception's layers and its classifier.
Kept different from ADM's TensorFlow code on purpose: distances and moments in float64 (ADM computes
k-NN distances in float16 where they are finite), symmetric eigensolvers instead of `sqrtm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

from vlt.metrics.intervals import bootstrap
from vlt.metrics.scores import FeatureSet, fd_to_features, moments, precision_recall, score, sqrt_psd

IS_SPLIT = 5000  # ADM (after improved-gan): IS per split of 5000 samples, then the mean
PR_K = 3  # ADM's ManifoldEstimator nhood_sizes=(3,)
BOOTSTRAP_MAX = 5000  # above this many images per side: point values only (KID/P-R bootstrap is O(N M))
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' KernelInceptionDistance defaults
SFID_ONLY = "Inception-only: sFID is defined on Inception's mixed_6/conv features (--features inception)"
IS_ONLY = "Inception-only: IS is defined by Inception's ImageNet classifier (--features inception)"


class Features(NamedTuple):
    """Features of one image set: pool (N, F); spatial (N, S) and logits (N, L) from Inception only."""

    pool: Tensor
    spatial: Tensor | None = None
    logits: Tensor | None = None


@dataclass(frozen=True)
class Moments:
    """Mean (F,) and unbiased covariance (F, F), float64."""

    mu: Tensor
    sigma: Tensor

    @classmethod
    def of(cls, x: Tensor) -> Moments:
        return cls(*moments(x))


@dataclass(frozen=True)
class Reference:
    """The reference side: its features (None for a statistics-only batch) and the moments FID uses."""

    features: Features | None
    pool: Moments
    spatial: Moments | None = None
    precomputed: bool = False

    @classmethod
    def of(cls, features: Features) -> Reference:
        spatial = Moments.of(features.spatial) if features.spatial is not None else None
        return cls(features, Moments.of(features.pool), spatial)


@dataclass(frozen=True)
class Result:
    """One reported number: value (None: unavailable), half-width of its 95% interval, how, and why."""

    value: float | None
    half: float | None = None
    method: str = "none"
    note: str = ""


def names(kind: str) -> dict[str, str]:
    """Reported name of each metric: ADM's names with Inception, else `<metric>_<extractor>` and fd."""
    if kind == "inception":
        return {m: m for m in ("fid", "sfid", "is", "precision", "recall", "kid")}
    return {"fid": f"fd_{kind}", "sfid": "sfid", "is": "is"} | {
        m: f"{m}_{kind}" for m in ("precision", "recall", "kid")
    }


def inception_score(logits: Tensor, split_size: int = IS_SPLIT) -> float:
    """(M, L) unbiased logits -> IS, ADM's way: splits of `split_size` samples, mean of exp(mean KL).

    Written here: torchmetrics' InceptionScore cuts the set into a fixed number of chunks and needs
    torch-fidelity's network for its input; ADM's definition cuts fixed-size splits.
    """
    log_p = torch.log_softmax(logits.double(), dim=1)  # (M, L) log p(y|x)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]  # (m, L)
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))  # (L,) log p(y)
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def frechet(reference: Moments, samples: Tensor, *, replicates: int, seed: int) -> Result:
    """Fréchet distance of samples (M, F) to the reference moments, bootstrap over the samples."""
    if len(samples) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples, got {len(samples)}")
    if samples.shape[1] != reference.mu.shape[0]:
        raise ValueError(
            f"the reference statistics have {reference.mu.shape[0]} features, the samples "
            f"{samples.shape[1]}: they come from different extractors (or layers)"
        )
    mu, root, trace = reference.mu, sqrt_psd(reference.sigma), float(reference.sigma.trace())
    x = samples.double()
    statistic = lambda _, fi: {"fd": fd_to_features(mu, root, trace, x[fi])}
    if replicates < 2:
        return Result(statistic(None, torch.arange(len(x)))["fd"])
    estimate = bootstrap(statistic, 1, len(x), replicates=replicates, seed=seed)["fd"]
    return Result(estimate.mean, estimate.half, estimate.method)


def kid_subsets(real: Tensor, fake: Tensor, *, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of unbiased MMD^2 over `KID_SUBSETS` subsets of `KID_SUBSET_SIZE` per side.

    For sets too large for the full (N, N) kernels; the loop is torchmetrics' KID on given features.
    """
    m = min(KID_SUBSET_SIZE, len(real), len(fake))
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(KID_SUBSETS):
        r = real[torch.randperm(len(real), generator=generator)[:m]].double()  # (m, F)
        g = fake[torch.randperm(len(fake), generator=generator)[:m]].double()  # (m, F)
        values.append(maximum_mean_discrepancy(poly_kernel(r, r), poly_kernel(r, g), poly_kernel(g, g)))
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std())


def set_scores(real: Tensor, fake: Tensor, *, replicates: int, seed: int) -> dict[str, Result]:
    """kid, precision, recall: with bootstrap intervals up to `BOOTSTRAP_MAX` images, else point values."""
    if max(len(real), len(fake)) <= BOOTSTRAP_MAX and replicates >= 2:
        estimates = score(
            FeatureSet(real), FeatureSet(fake), ("kid", "precision", "recall"), k=PR_K,
            replicates=replicates, seed=seed, subset_std=False,
        )  # fmt: skip
        return {name: Result(e.mean, e.half, e.method) for name, e in estimates.items()}
    precision, recall = precision_recall(real, fake, k=PR_K)
    out = {"precision": Result(precision), "recall": Result(recall)}
    if max(len(real), len(fake)) <= BOOTSTRAP_MAX:
        kid_all = score(FeatureSet(real), FeatureSet(fake), ("kid",), replicates=0, subset_std=False)
        out["kid"] = Result(kid_all["kid"].mean)
    else:
        mean, std = kid_subsets(real, fake, seed=seed)
        note = f"mean over {KID_SUBSETS} subsets of {KID_SUBSET_SIZE}; subset std {std:.3g}"
        out["kid"] = Result(mean, None, "subsets", note)
    return out


def evaluate(
    samples: Features, reference: Reference, *, kind: str, replicates: int = 200, seed: int = 0
) -> dict[str, Result]:
    """Every metric of the protocol, keyed by its reported name (`names(kind)`); see the module doc."""
    name = names(kind)
    out = {name["fid"]: frechet(reference.pool, samples.pool, replicates=replicates, seed=seed)}
    if kind != "inception":
        out[name["sfid"]] = Result(None, note=SFID_ONLY)
    elif reference.spatial is None or samples.spatial is None:
        out[name["sfid"]] = Result(None, note="the reference holds neither images nor mu_s/sigma_s")
    else:
        out[name["sfid"]] = frechet(reference.spatial, samples.spatial, replicates=replicates, seed=seed)
    if kind != "inception" or samples.logits is None:
        out[name["is"]] = Result(None, note=IS_ONLY)
    else:
        out[name["is"]] = Result(inception_score(samples.logits), note=f"mean over splits of {IS_SPLIT}")
    if reference.features is None:
        missing = "the reference holds statistics only (no arr_0 images): needs reference features"
        out |= {name[m]: Result(None, note=missing) for m in ("kid", "precision", "recall")}
    else:
        sets = set_scores(reference.features.pool, samples.pool, replicates=replicates, seed=seed)
        out |= {name[m]: value for m, value in sets.items()}
    return out
