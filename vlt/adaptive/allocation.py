"""Content-adaptive token counts: choose K_i per image over the nested merge levels (vlt's extension).

Letters: B images, G grid levels (the K values of the global pattern, ascending).

The merge cuts are nested, so every image can pick its own level K_i of the SAME global pattern
(the generator still knows the pattern at sampling time; per-image patterns cost gFID in the paper).
Given each image's distortion curve D_i(K) over the grid:

- Lagrangian rule: K_i = argmin_K D_i(K) + lambda * cost(K). One lambda for all images is the
  equal-slope condition: no other allocation with the same total cost has lower total distortion
  (over the grid's convex hull). `solve_lambda` bisects lambda so that the mean cost hits a budget.
- Threshold rule: the smallest K with D_i(K) <= tau (the largest K when none reaches it).
- Quality targets (`target_cost`): the question asked the other way round. For a PSNR floor and a
  share p of the images, what mean K (or K^2) does one fixed K need, and what does a K per image need?

cost is "k" (tokens, storage) or "k2" (attention FLOPs grow with K^2): a budget is always written as
an equivalent fixed K, so "k2" at budget 8 means mean K_i^2 = 64, the attention cost of K = 8.
Distortion is anything where lower is better; `to_distortion` turns PSNR curves into the two vlt
uses: "mse" (squared error: optimal for the set's mean squared error; busy images get the tokens)
and "neg_psnr" (-PSNR: optimal for the mean of per-image PSNR; whoever gains the most dB per token
gets them, which on smooth synthetic images are the simple ones).
"""

from __future__ import annotations

from math import ceil
from typing import Literal, get_args

import torch
from torch import Tensor

Cost = Literal["k", "k2"]
COSTS: tuple[str, ...] = get_args(Cost)
Distortion = Literal["neg_psnr", "mse"]
DISTORTIONS: tuple[str, ...] = get_args(Distortion)


def to_distortion(psnr: Tensor | float, kind: Distortion) -> Tensor:
    """PSNR dB (any shape) -> distortion, lower is better: -PSNR or the MSE in [0, 1] pixel units."""
    if kind not in DISTORTIONS:
        raise ValueError(f"distortion={kind!r} is not supported; choose one of {DISTORTIONS}")
    psnr = torch.as_tensor(psnr).double()
    return -psnr if kind == "neg_psnr" else torch.pow(10.0, -psnr / 10)


def cost_of(grid: list[int] | Tensor, cost: Cost = "k") -> Tensor:
    """Cost per grid level (G,) float64: K or K^2."""
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is not supported; choose one of {COSTS}")
    k = torch.as_tensor(grid, dtype=torch.float64)
    return k if cost == "k" else k * k


def check_grid(grid: list[int]) -> list[int]:
    grid = [int(k) for k in grid]
    if not grid or grid != sorted(set(grid)) or grid[0] < 1:
        raise ValueError(f"grid must be ascending distinct positive K values, got {grid}")
    return grid


def lagrangian(d: Tensor, grid: list[int], lam: float, cost: Cost = "k") -> Tensor:
    """K_i = argmin_K d_i(K) + lam * cost(K); ties go to the smaller K.

    Args:
        d: (B, G) distortion per image and grid level (lower is better).
        grid: the G token counts, ascending.
        lam: price of one unit of cost, >= 0.

    Returns:
        (B,) long, the chosen K per image.
    """
    grid = check_grid(grid)
    if d.ndim != 2 or d.shape[1] != len(grid):
        raise ValueError(f"distortion must be (B, {len(grid)}) for grid {grid}, got {tuple(d.shape)}")
    objective = d.double() + lam * cost_of(grid, cost).to(d.device)  # (B, G)
    # argmin returns the first minimum: the smallest K among ties.
    return torch.as_tensor(grid, device=d.device)[objective.argmin(dim=1)]


def mean_cost(ks: Tensor, cost: Cost = "k") -> float:
    """Mean cost of an allocation, in equivalent-K units (sqrt of mean K^2 for "k2")."""
    c = ks.double() if cost == "k" else ks.double().pow(2)
    m = float(c.mean())
    return m if cost == "k" else m**0.5


def solve_lambda(d: Tensor, grid: list[int], budget: float, cost: Cost = "k", *, iters: int = 100) -> float:
    """The smallest lambda whose allocation keeps the mean cost within `budget` (bisection).

    The mean cost never rises with lambda, so bisection converges; because the grid is discrete,
    the achieved mean can sit below the budget (by less than one grid step for a large set).

    Args:
        d: (B, G) distortions.
        grid: ascending K values.
        budget: the requested mean K (cost "k") or the K whose K^2 is the requested mean K^2 ("k2").
    """
    grid = check_grid(grid)
    if not grid[0] <= budget <= grid[-1]:
        raise ValueError(f"budget {budget} is outside the grid's range [{grid[0]}, {grid[-1]}]")
    if mean_cost(lagrangian(d, grid, 0.0, cost), cost) <= budget:
        return 0.0
    spread = float(d.max() - d.min()) if d.numel() else 1.0
    unit = float(cost_of(grid, cost)[1:].sub(cost_of(grid, cost)[:-1]).min()) if len(grid) > 1 else 1.0
    lo, hi = 0.0, max(spread, 1e-12) / unit * 2 + 1e-12  # at hi every image takes the smallest K
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mean_cost(lagrangian(d, grid, mid, cost), cost) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def allocate(d: Tensor, grid: list[int], budget: float, cost: Cost = "k") -> tuple[Tensor, float]:
    """Lagrangian allocation at a mean budget: (K_i (B,), lambda)."""
    lam = solve_lambda(d, grid, budget, cost)
    return lagrangian(d, grid, lam, cost), lam


def threshold(d: Tensor, grid: list[int], tau: float) -> Tensor:
    """K_i = the smallest K with d_i(K) <= tau, else the largest K. (B, G) -> (B,) long."""
    grid = check_grid(grid)
    ok = d <= tau  # (B, G)
    first = torch.where(
        ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], len(grid) - 1, dtype=torch.long)
    )
    return torch.as_tensor(grid, device=d.device)[first]


def target_cost(psnr: Tensor, grid: list[int], floor: float, share: float, cost: Cost = "k") -> dict:
    """What it costs for at least `share` of the images to reach `floor` dB: fixed K vs a K per image.

    psnr (B, G): per-image PSNR over the grid, non-decreasing in K (nested cuts). Fixed: the smallest
    grid K at which the share of images at or above the floor is >= share (None: no K gets there).
    Per image: image i needs K*_i, its smallest K at the floor; the ceil(share * B) images with the
    cheapest K*_i get it and the others take the smallest K. That is the cheapest allocation in which
    that many images reach the floor (any such allocation pays at least cost(K*_i) for each image that
    reaches it and cost(grid[0]) for the rest, and this picks the cheapest). Costs are written as an
    equivalent K as everywhere here (sqrt of mean K^2 for "k2"); `saving` = fixed / per-image cost.
    """
    grid = check_grid(grid)
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    costs = cost_of(grid, cost)  # (G,)
    ok = psnr.double() >= floor  # (B, G)
    need = ceil(share * len(psnr) - 1e-9)
    reached = ok.double().mean(0)  # (G,) share at the floor per fixed K
    hit = (reached * len(psnr) >= need - 1e-9).nonzero()
    fixed = grid[int(hit[0])] if len(hit) else None
    first = torch.where(ok.any(1), ok.double().argmax(1), torch.full((len(psnr),), -1))  # (B,) -1: never
    reachable = (first >= 0).nonzero().squeeze(1)
    out = {"floor": floor, "share": share, "fixed_k": fixed}
    if len(reachable) < need:
        return {**out, "k": None, "cost": None, "saving": None}
    order = reachable[costs[first[reachable]].argsort(stable=True)][:need]  # cheapest images to lift
    index = torch.zeros(len(psnr), dtype=torch.long)
    index[order] = first[order]
    ks = torch.as_tensor(grid)[index]  # (B,)
    per_image = float(costs[index].mean()) if cost == "k" else float(costs[index].mean().sqrt())
    saving = fixed / per_image if fixed else None  # a fixed K costs K in K-equivalent units
    return {**out, "k": ks, "cost": per_image, "saving": saving}


def k_histogram(ks: Tensor, labels: Tensor, grid: list[int], num_classes: int) -> Tensor:
    """p(K | class): (num_classes + 1, G) rows summing to 1; the last row is over all images.

    A class with no image gets the all-images row.
    """
    grid = check_grid(grid)
    index = torch.searchsorted(torch.as_tensor(grid), ks.cpu())  # (B,)
    counts = torch.zeros(num_classes + 1, len(grid), dtype=torch.float64)
    valid = (labels >= 0) & (labels < num_classes)
    counts.index_put_(
        (labels[valid].cpu(), index[valid]),
        torch.ones(int(valid.sum()), dtype=torch.float64),
        accumulate=True,
    )
    counts[num_classes] = torch.bincount(index, minlength=len(grid)).double()
    total = counts.sum(1, keepdim=True)
    overall = counts[num_classes] / counts[num_classes].sum().clamp_min(1)
    return torch.where(total > 0, counts / total.clamp_min(1), overall)


def tilt(p: Tensor, grid: list[int], mu: float, cost: Cost = "k") -> Tensor:
    """Exponentially tilted p(K | class) ∝ p(K | class) * exp(-mu * cost(K)): (R, G) -> (R, G)."""
    logits = (
        p.double().clamp_min(1e-12).log() - mu * cost_of(grid, cost).to(p.device) / cost_of(grid, cost)[-1]
    )
    return torch.softmax(logits, dim=-1)


def expected_cost(p: Tensor, grid: list[int], cost: Cost = "k") -> float:
    """Mean over rows of E[cost(K)], in equivalent-K units. p: (R, G)."""
    m = float((p.double() * cost_of(grid, cost).to(p.device)).sum(-1).mean())
    return m if cost == "k" else m**0.5


def tilt_to_budget(
    p: Tensor, grid: list[int], budget: float, cost: Cost = "k", *, iters: int = 100
) -> tuple[Tensor, float]:
    """Tilt per-row K distributions so their average expected cost equals `budget` (bisection on mu).

    Used at sampling time: the images of a batch keep their class's preference for small or large K
    while the batch as a whole meets the user's budget. Returns (tilted (R, G), mu).
    """
    grid = check_grid(grid)
    if not grid[0] <= budget <= grid[-1]:
        raise ValueError(f"budget {budget} is outside the grid's range [{grid[0]}, {grid[-1]}]")
    lo, hi = -1.0, 1.0
    while expected_cost(tilt(p, grid, lo, cost), grid, cost) < budget and lo > -1e4:
        lo *= 2
    while expected_cost(tilt(p, grid, hi, cost), grid, cost) > budget and hi < 1e4:
        hi *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if expected_cost(tilt(p, grid, mid, cost), grid, cost) > budget:
            lo = mid
        else:
            hi = mid
    mu = 0.5 * (lo + hi)
    return tilt(p, grid, mu, cost), mu


def draw(p: Tensor, grid: list[int], generator: torch.Generator | None = None) -> Tensor:
    """One K per row of p (B, G), stratified: row i uses quantile (perm_i + u) / B of its own CDF.

    With identical rows the K histogram matches p to within one image per level, so the batch's mean
    K follows the budget closely instead of fluctuating like independent draws.
    """
    b = p.shape[0]
    perm = torch.randperm(b, generator=generator).double()
    u = (perm + torch.rand((), generator=generator, dtype=torch.float64)) / b  # (B,)
    cdf = p.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    index = (cdf < u[:, None]).sum(-1).clamp_max(len(grid) - 1)  # (B,)
    return torch.as_tensor(grid)[index]
