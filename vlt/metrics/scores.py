"""Real-vs-generated scores on feature tensors: Fréchet distance, KID, precision/recall, class consistency.

Letters: N real samples, M generated samples, F features, C classes.

Pure functions of feature tensors (no Trainer, no network), so any evaluator can reuse them. The
Fréchet distance is only called FID by a caller whose features are Inception's; here it is `fd`.
  * fd: ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r^1/2 S_g S_r^1/2)^1/2), symmetric eigensolvers.
  * kid: unbiased MMD^2 with the cubic polynomial kernel of Binkowski et al. 2018 (torchmetrics'
    `poly_kernel`), on all samples (unequal N and M allowed), plus torchmetrics' subset estimate and
    its std over subsets (`maximum_mean_discrepancy`).
  * precision / recall: Kynkaanniemi et al. 2019, k-NN balls around each sample. No well-kept
    library ships it beside torch (the authors' code is TensorFlow), so it is written here.
  * class consistency: accuracy of the feature net's classifier on samples generated for a class.
`score` returns every requested value as an `Estimate` with a bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

from vlt.metrics.intervals import Estimate, bootstrap

SCORES = ("fd", "kid", "precision", "recall", "class_acc")


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """(N, F) -> mean (F,), unbiased covariance (F, F), float64."""
    x = x.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def sqrt_psd(cov: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(cov)  # (F,), (F, F)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def fd_from_moments(mu_r: Tensor, root_r: Tensor, trace_r: float, mu_g: Tensor, cov_g: Tensor) -> float:
    """Fréchet distance with the real side given as mean, S_r^1/2 and tr S_r (precomputed once)."""
    middle = root_r @ cov_g @ root_r  # (F, F), symmetric PSD
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_r - mu_g).square().sum() + trace_r + cov_g.trace() - 2 * trace_sqrt)


def fd_to_features(mu_r: Tensor, root_r: Tensor, trace_r: float, fake: Tensor) -> float:
    """`fd_from_moments` with the generated side as features (M, F): the trace term comes from the
    eigenvalues of A^T A or A A^T with A = (fake - mean) S_r^1/2, whichever is smaller (same nonzero
    eigenvalues), so a bootstrap over a few samples of wide features stays cheap."""
    x = fake.double()
    mu_g = x.mean(0)
    a = (x - mu_g) @ root_r  # (M, F)
    gram = a @ a.T if len(a) < a.shape[1] else a.T @ a  # (min(M, F),) * 2
    trace_sqrt = torch.linalg.eigvalsh(gram / (len(x) - 1)).clamp_min(0).sqrt().sum()
    trace_g = (x - mu_g).square().sum() / (len(x) - 1)
    return float((mu_r - mu_g).square().sum() + trace_r + trace_g - 2 * trace_sqrt)


def frechet(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to real (N, F) and generated (M, F) features."""
    mu_r, cov_r = moments(real)
    mu_g, cov_g = moments(fake)
    return fd_from_moments(mu_r, sqrt_psd(cov_r), float(cov_r.trace()), mu_g, cov_g)


def _offdiag_mean(k: Tensor, index: Tensor) -> Tensor:
    """Mean of k[i, j] over pairs of distinct samples of `index` (a resample repeats some)."""
    sub = k[index][:, index]
    distinct = index[:, None] != index[None, :]
    return (sub * distinct).sum() / distinct.sum()


def kid(real: Tensor, fake: Tensor, *, subsets: int = 50, subset_size: int | None = None, seed: int = 0):
    """(unbiased MMD^2 on all samples, mean over subsets, std over subsets), cubic polynomial kernel.

    Subsets follow torchmetrics' KernelInceptionDistance: `subsets` draws of `subset_size` samples
    without replacement from each side (default half of the smaller side, so subsets differ).
    """
    real, fake = real.double(), fake.double()
    k_rr, k_ff, k_rf = poly_kernel(real, real), poly_kernel(fake, fake), poly_kernel(real, fake)
    full = _offdiag_mean(k_rr, torch.arange(len(real))) + _offdiag_mean(k_ff, torch.arange(len(fake)))
    full = float(full - 2 * k_rf.mean())
    m = subset_size or min(len(real), len(fake)) // 2
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = torch.randperm(len(real), generator=generator)[:m]
        g = torch.randperm(len(fake), generator=generator)[:m]
        values.append(maximum_mean_discrepancy(k_rr[r][:, r], k_rf[r][:, g], k_ff[g][:, g]))
    if len(values) < 2:
        return full, float(values[0]) if values else float("nan"), float("nan")
    stacked = torch.stack(values)
    return full, float(stacked.mean()), float(stacked.std())


def knn_radii(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """(N, F) -> (N,) distance of each sample to its k-th nearest other sample.

    Rows go `chunk` at a time, so memory is O(chunk N), not O(N^2) (50k samples: 0.8 GB, not 20 GB).
    """
    x = x.double()
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x)  # (chunk, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 0 on the diagonal is the first
    return torch.cat(radii)


def in_manifold(reference: Tensor, radii: Tensor, queries: Tensor, chunk: int = 4096) -> Tensor:
    """(Q,) bool: query q lies in some ball |q - x| <= radii[x] around a reference sample x."""
    out = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk].double(), reference.double())  # (Q_c, N)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019: precision = share of generated samples inside the real k-NN manifold,
    recall = share of real samples inside the generated one."""
    precision = in_manifold(real, knn_radii(real, k), fake).double().mean()
    recall = in_manifold(fake, knn_radii(fake, k), real).double().mean()
    return float(precision), float(recall)


def class_consistency(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[float, Tensor]:
    """(mean over classes of per-class accuracy, per-class accuracy (C,), NaN for absent classes)."""
    correct = (logits.argmax(1) == labels).double()
    per_class = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for c in labels.unique().tolist():
        per_class[c] = correct[labels == c].mean()
    return _balanced(correct, labels, num_classes), per_class


@dataclass
class FeatureSet:
    """Features (N, F) of a set of images; class logits (N, C) and labels (N,) where known."""

    features: Tensor
    logits: Tensor | None = None
    labels: Tensor | None = None


def score(
    real: FeatureSet,
    fake: FeatureSet,
    metrics: Sequence[str] = SCORES,
    *,
    k: int = 3,
    replicates: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    resample_real: bool = False,
    subset_std: bool = True,
) -> dict[str, Estimate]:
    """Every metric of `metrics` with a bootstrap interval (plus `kid_subset_std` with kid, if asked).

    fd and kid are recomputed on each resample (duplicates never pair with themselves in kid's
    unbiased sums); precision and recall keep each sample's k-NN radius from its full set, so a
    resample's manifold is the union of its samples' balls; class_acc (needs fake logits and labels)
    resamples generated samples. O(N M) memory for precision/recall (chunk outside for huge sets).
    """
    unknown = sorted(set(metrics) - set(SCORES))
    if unknown:
        raise ValueError(f"unknown scores {unknown}; expected a subset of {SCORES}")
    r, g = real.features.double(), fake.features.double()
    mu_r, cov_r = moments(r)
    root_r, trace_r = sqrt_psd(cov_r), float(cov_r.trace())
    if "kid" in metrics:
        k_rr, k_ff, k_rf = poly_kernel(r, r), poly_kernel(g, g), poly_kernel(r, g)
    if {"precision", "recall"} & set(metrics):
        in_real_ball, in_fake_ball = _balls(r, g, k)
    if "class_acc" in metrics:
        correct, num_classes = _correct(fake)

    def statistic(ri: Tensor, fi: Tensor) -> dict[str, float]:
        out = {}
        if "fd" in metrics:
            if len(ri) == len(r) and bool((ri == torch.arange(len(r))).all()):
                real_side = (mu_r, root_r, trace_r)
            else:
                mu, cov = moments(r[ri])
                real_side = (mu, sqrt_psd(cov), float(cov.trace()))
            out["fd"] = fd_to_features(*real_side, g[fi])
        if "kid" in metrics:
            value = _offdiag_mean(k_rr, ri) + _offdiag_mean(k_ff, fi) - 2 * k_rf[ri][:, fi].mean()
            out["kid"] = float(value)
        # A resample keeps every ball at its full-set radius; its manifold is the union of its balls.
        if "precision" in metrics:
            out["precision"] = float(in_real_ball[fi][:, ri].any(1).double().mean())
        if "recall" in metrics:
            out["recall"] = float(in_fake_ball[ri][:, fi].any(1).double().mean())
        if "class_acc" in metrics:
            out["class_acc"] = _balanced(correct[fi], fake.labels[fi], num_classes)
        return out

    estimates = bootstrap(
        statistic, len(r), len(g), replicates=replicates, confidence=confidence, seed=seed,
        resample_real=resample_real,
    )  # fmt: skip
    if "kid" in metrics and subset_std:
        estimates["kid_subset_std"] = Estimate(kid(r, g, seed=seed)[2], 0.0, 1, "subsets")
    return estimates


def _balls(r: Tensor, g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(M, N): generated i inside real j's k-NN ball; (N, M): real j inside generated i's ball."""
    d = torch.cdist(g, r)  # (M, N)
    return d <= knn_radii(r, k)[None, :], knn_radii(g, k)[None, :] >= d.T


def _correct(fake: FeatureSet) -> tuple[Tensor, int]:
    """(M,) 1.0 where the feature net's classifier gives a generated sample its label; class count."""
    if fake.logits is None or fake.labels is None:
        raise ValueError("class_acc needs logits and labels of the generated samples")
    return (fake.logits.argmax(1) == fake.labels).double(), fake.logits.shape[1]


def _balanced(correct: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over the classes present of the share of correct samples: (M,) float, (M,) long."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    present = counts > 0
    return float((hits[present] / counts[present]).mean())
