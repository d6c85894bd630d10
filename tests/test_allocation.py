"""Allocation rules against oracles: budget hitting, brute-force optimality, threshold semantics,
p(K | class) and budget-tilted draws."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vlt.adaptive import allocation as A

GRID = [4, 8, 16, 32]


def random_curves(b: int, grid: list[int], generator: torch.Generator) -> torch.Tensor:
    """(B, G) distortions falling with K at random rates (-PSNR-like), generic (no ties)."""
    steps = torch.rand(b, len(grid), generator=generator, dtype=torch.float64) * 3  # (B, G)
    return 20 * torch.rand(b, 1, generator=generator, dtype=torch.float64) - steps.cumsum(1)


@pytest.mark.parametrize("cost", ["k", "k2"])
def test_solve_lambda_hits_the_budget(cost):
    g = torch.Generator().manual_seed(0)
    b = 300
    d = random_curves(b, GRID, g)
    c = A.cost_of(GRID, cost)
    for budget in torch.linspace(GRID[0], GRID[-1], 23).tolist():
        lam = A.solve_lambda(d, GRID, budget, cost)
        achieved = A.mean_cost(A.lagrangian(d, GRID, lam, cost), cost)
        # Never above the budget; below it by at most one image's jump (far less than a grid step).
        assert achieved <= budget + 1e-9
        target, got = (budget, achieved) if cost == "k" else (budget**2, achieved**2)
        assert target - got <= float(c[-1] - c[0]) / b + 1e-9
        assert budget - achieved < min(k2 - k1 for k1, k2 in itertools.pairwise(GRID))


def test_solve_lambda_refuses_a_budget_outside_the_grid():
    d = torch.zeros(3, len(GRID))
    with pytest.raises(ValueError, match="outside the grid"):
        A.solve_lambda(d, GRID, 2.0)


@pytest.mark.parametrize("cost", ["k", "k2"])
def test_lagrangian_is_optimal_against_brute_force(cost):
    g = torch.Generator().manual_seed(1)
    grid = [1, 2, 4, 8]
    c = A.cost_of(grid, cost)
    for _ in range(20):
        d = random_curves(3, grid, g)  # (3, G)
        choices = torch.tensor(list(itertools.product(range(len(grid)), repeat=3)))  # (G^3, 3)
        total_d = d.gather(1, choices.T).sum(0)  # (G^3,)
        total_c = c[choices].sum(1)  # (G^3,)
        for lam in torch.rand(8, generator=g, dtype=torch.float64).mul(3).tolist():
            ks = A.lagrangian(d, grid, lam, cost)
            index = torch.searchsorted(torch.tensor(grid), ks)
            d_star, c_star = d[torch.arange(3), index].sum(), c[index].sum()
            cheaper = total_c <= c_star + 1e-12
            assert (total_d[cheaper] >= d_star - 1e-9).all()


def test_threshold_takes_the_smallest_k_that_reaches_tau():
    d = torch.tensor([[-20.0, -25.0, -30.0, -35.0], [-10.0, -11.0, -12.0, -13.0], [-40.0, -41, -42, -43]])
    # tau = -28 means PSNR >= 28 dB: image 0 first reaches it at K=16, image 1 never (largest K),
    # image 2 already at the smallest K.
    assert A.threshold(d, GRID, -28.0).tolist() == [16, 32, 4]
    g = torch.Generator().manual_seed(2)
    d = random_curves(50, GRID, g)
    tau = float(d.median())
    ks = A.threshold(d, GRID, tau)
    for i in range(50):
        ok = [k for k, v in zip(GRID, d[i].tolist(), strict=True) if v <= tau]
        assert ks[i] == (ok[0] if ok else GRID[-1])


def test_k_histogram_rows_are_distributions():
    ks = torch.tensor([4, 4, 8, 32, 16, 16, 4])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, -1])
    p = A.k_histogram(ks, labels, GRID, num_classes=3)
    assert p.shape == (4, len(GRID))
    assert torch.allclose(p.sum(1), torch.ones(4, dtype=torch.float64))
    assert p[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert p[1].tolist() == pytest.approx([0, 0, 2 / 3, 1 / 3])
    assert torch.equal(p[2], p[3])  # an empty class falls back to the all-images row
    assert p[3].tolist() == pytest.approx([3 / 7, 1 / 7, 2 / 7, 1 / 7])


@pytest.mark.parametrize("cost", ["k", "k2"])
@pytest.mark.parametrize("budget", [6.0, 12.0])
def test_tilted_draws_meet_the_budget(cost, budget):
    g = torch.Generator().manual_seed(3)
    p = torch.rand(5, len(GRID), generator=g, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True)  # (classes, G)
    tilted, _ = A.tilt_to_budget(p, GRID, budget, cost)
    assert A.expected_cost(tilted, GRID, cost) == pytest.approx(budget, abs=1e-6)
    labels = torch.arange(5).repeat_interleave(800)  # balanced classes
    ks = A.draw(tilted[labels], GRID, generator=g)
    assert A.mean_cost(ks, cost) == pytest.approx(budget, abs=0.3)
    # Identical rows: the stratified draw matches p to within one image per level.
    same = A.draw(tilted[:1].expand(1000, -1), GRID, generator=g)
    counts = torch.bincount(torch.searchsorted(torch.tensor(GRID), same), minlength=len(GRID))
    assert (counts.double() - 1000 * tilted[0]).abs().max() <= 1.0 + 1e-9


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cost", ["k", "k2"])
def test_target_cost_is_the_cheapest_allocation_that_lifts_the_share(seed, cost):
    """Oracle: every allocation of 5 images over 3 levels, searched exhaustively."""
    g = torch.Generator().manual_seed(seed)
    grid = [4, 8, 16]
    psnr = (torch.rand(5, 3, generator=g) * 3).cumsum(1) + 18  # (B, G) non-decreasing in K
    floor, share = 21.0, [0.4, 0.6, 0.8][seed % 3]
    need = math.ceil(share * 5)
    c = {4: 4.0, 8: 8.0, 16: 16.0} if cost == "k" else {4: 16.0, 8: 64.0, 16: 256.0}
    best = None
    for ks in itertools.product(range(3), repeat=5):
        lifted = sum(bool(psnr[i, j] >= floor) for i, j in enumerate(ks))
        if lifted >= need:
            mean = sum(c[grid[j]] for j in ks) / 5
            best = mean if best is None else min(best, mean)
    fixed = next((k for j, k in enumerate(grid) if int((psnr[:, j] >= floor).sum()) >= need), None)
    out = A.target_cost(psnr, grid, floor, share, cost)
    assert out["fixed_k"] == fixed
    if best is None:
        assert out["k"] is None
    else:
        expected = best if cost == "k" else math.sqrt(best)
        assert out["cost"] == pytest.approx(expected)
        lifted = (psnr.gather(1, torch.searchsorted(torch.tensor(grid), out["k"])[:, None]) >= floor).sum()
        assert int(lifted) >= need
        if fixed is not None:
            assert out["saving"] == pytest.approx(fixed / expected) and out["saving"] >= 1 - 1e-9
