"""Scores on feature tensors against independent numpy computations; interval coverage in simulations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from vlt.metrics import frechet_distance
from vlt.metrics.intervals import Estimate, bootstrap, combine, paired, t_interval, welch
from vlt.metrics.scores import (
    FeatureSet,
    class_consistency,
    frechet,
    kid,
    precision_recall,
    score,
)


def features(seed: int, n: int, d: int, shift: float = 0.0, spread: float = 1.0) -> np.ndarray:
    """n samples (seeded by `seed`) of one correlated Gaussian law per (d, shift, spread)."""
    mix = np.random.default_rng([d, 7]).normal(size=(d, d)) / np.sqrt(d)  # the law: fixed, not per draw
    return (np.random.default_rng(seed).normal(size=(n, d)) * spread) @ (np.eye(d) + 0.3 * mix) + shift


def numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, kernel (x.y / d + 1)^3, written with explicit loops over the pair sums."""
    d = x.shape[1]
    kern = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy, kxy = kern(x, x), kern(y, y), kern(x, y)
    n, m = len(x), len(y)
    sxx = sum(kxx[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(kyy[i, j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def numpy_precision_recall(x: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float]:
    def radii(a):
        dist = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
        return np.sort(dist, axis=1)[:, k]

    def inside(ref, r, queries):
        return np.mean([np.any(np.sqrt(((ref - q) ** 2).sum(-1)) <= r) for q in queries])

    return inside(x, radii(x), y), inside(y, radii(y), x)


def test_frechet_matches_scipy_sqrtm():
    x, y = features(0, 300, 6), features(1, 200, 6, shift=0.4, spread=1.3)
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-8)


def test_fd_on_features_equals_fd_on_moments_for_few_and_many_samples():
    from vlt.metrics.scores import fd_to_features, moments, sqrt_psd

    x = torch.tensor(features(0, 300, 12))
    mu, cov = moments(x)
    for n in (5, 200):  # fewer samples than features (Gram side) and more
        y = torch.tensor(features(1, n, 12, shift=0.2))
        expected = frechet(x, y)
        assert fd_to_features(mu, sqrt_psd(cov), float(cov.trace()), y) == pytest.approx(expected, rel=1e-6)


def test_kid_matches_numpy_unbiased_mmd_and_subsets_are_unbiased_too():
    x, y = features(2, 60, 5), features(3, 45, 5, shift=0.5)
    full, subset_mean, subset_std = kid(torch.tensor(x), torch.tensor(y), subsets=200, seed=0)
    assert full == pytest.approx(numpy_kid(x, y), rel=1e-9)
    assert subset_std > 0 and abs(subset_mean - full) < subset_std  # both unbiased for the same MMD^2
    z = features(4, 60, 5)  # same distribution as x: the unbiased estimate straddles 0
    values = [kid(torch.tensor(features(10 + s, 60, 5)), torch.tensor(z), subsets=1)[0] for s in range(40)]
    assert min(values) < 0 < max(values)


def test_precision_recall_match_numpy_brute_force():
    x, y = features(5, 80, 4), features(6, 70, 4, shift=0.8, spread=0.6)
    for k in (1, 3, 5):
        assert precision_recall(torch.tensor(x), torch.tensor(y), k) == pytest.approx(
            numpy_precision_recall(x, y, k)
        )
    p, r = precision_recall(torch.tensor(x), torch.tensor(y), 3)
    assert p > r  # a narrow shifted set: mostly inside the real manifold, covers little of it


def test_class_consistency_is_balanced_accuracy():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 1, 0]), 4).float()
    mean, per_class = class_consistency(logits, labels, 4)
    assert per_class[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.0]) and torch.isnan(per_class[3])
    assert mean == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_score_point_estimates_equal_the_functions():
    x, y = torch.tensor(features(7, 120, 4)), torch.tensor(features(8, 100, 4, shift=0.3))
    logits, labels = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)), torch.arange(100) % 3
    out = score(FeatureSet(x), FeatureSet(y, logits, labels), replicates=20)
    assert out["fd"].mean == pytest.approx(frechet(x, y))
    assert out["kid"].mean == pytest.approx(kid(x, y)[0])
    assert (out["precision"].mean, out["recall"].mean) == pytest.approx(precision_recall(x, y))
    assert out["class_acc"].mean == pytest.approx(class_consistency(logits, labels, 3)[0])
    assert all(e.half > 0 for name, e in out.items() if name != "kid_subset_std")
    with pytest.raises(ValueError, match="unknown scores"):
        score(FeatureSet(x), FeatureSet(y), ["fid"])


def test_t_interval_and_combine():
    e = t_interval([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.half == pytest.approx(4.302653 * 1 / np.sqrt(3), rel=1e-5)
    assert f"{e:.2f}" == "2.00 ± 2.48" and e.covers(0.0) and not e.covers(5.0)
    one = {"fd": Estimate(1.0, 0.1)}
    assert combine([one]) == one
    assert combine([one, {"fd": Estimate(3.0, 0.1)}])["fd"].mean == 2.0
    with pytest.raises(ValueError):
        t_interval([1.0])


def test_paired_difference_matches_scipy_and_covers_the_true_difference():
    """Two systems on the same seeds share a large per-seed noise: the paired interval of a - b covers
    the true difference at about the nominal rate and is far narrower than Welch's, which counts the
    shared noise on both sides."""
    a, b = [3.0, 5.0, 4.0, 6.0], [2.5, 4.6, 3.2, 5.1]
    d, half, p = paired(a, b)
    assert d == pytest.approx(np.mean(np.subtract(a, b)))
    assert p == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue)
    assert half == pytest.approx(t_interval(np.subtract(a, b)).half)
    assert paired([1.0, 2.0], [0.5, 1.5]) == (0.5, 0.0, 0.0) and paired([1.0, 2.0], [1.0, 2.0])[2] == 1.0
    with pytest.raises(ValueError, match="paired"):
        paired([1.0, 2.0], [1.0])
    rng = np.random.default_rng(0)
    hits, narrower = [], []
    for _ in range(400):
        shared = rng.normal(0, 1.0, 4)
        x, y = 0.3 + shared + rng.normal(0, 0.1, 4), shared + rng.normal(0, 0.1, 4)
        d, half, _ = paired(x, y)
        hits.append(abs(d - 0.3) <= half)
        narrower.append(half < welch(x, y)[1])
    assert 0.92 <= np.mean(hits) <= 0.98 and all(narrower)


def test_t_interval_over_seeds_covers_the_expected_kid_at_the_nominal_rate():
    """200 draws of 4 seeds each; the expected KID at n = 64 is known from 2000 draws (KID is unbiased,
    so this is also the population MMD^2)."""
    real = torch.tensor(features(0, 64, 4))

    def draw(s):
        return kid(real, torch.tensor(features(1000 + s, 64, 4, shift=0.3)), subsets=0)[0]

    values = np.array([draw(s) for s in range(2000)])
    truth = values.mean()
    hits = [t_interval(values[4 * i : 4 * i + 4]).covers(truth) for i in range(200)]
    assert 0.92 <= np.mean(hits) <= 0.98


@pytest.mark.parametrize("metric", ["fd", "kid"])
def test_bootstrap_interval_covers_the_expected_value_at_the_nominal_rate(metric):
    """Generated sets drawn against a fixed real set: the bootstrap interval of one draw covers the
    metric's expectation at that sample size (from 1000 draws) in about 95% of 200 draws."""
    n, d = 128, 4
    real = FeatureSet(torch.tensor(features(0, 256, d)))
    draws = [FeatureSet(torch.tensor(features(100 + s, n, d, shift=0.25, spread=1.1))) for s in range(1000)]
    values = [score(real, g, [metric], replicates=0)[metric].mean for g in draws]
    truth = float(np.mean(values))
    hits = [
        score(real, g, [metric], replicates=200, seed=s)[metric].covers(truth)
        for s, g in enumerate(draws[:200])
    ]
    assert 0.92 <= np.mean(hits) <= 0.98


def test_bootstrap_resamples_real_side_only_when_asked():
    calls = []

    def statistic(ri, fi):
        calls.append((ri.clone(), fi.clone()))
        return {"m": float(fi.double().mean() + ri.double().mean())}

    bootstrap(statistic, 5, 7, replicates=3)
    assert all(torch.equal(ri, torch.arange(5)) for ri, _ in calls)
    calls.clear()
    bootstrap(statistic, 5, 7, replicates=3, resample_real=True)
    assert not all(torch.equal(ri, torch.arange(5)) for ri, _ in calls[1:])
