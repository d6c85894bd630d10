"""Content-adaptive K for the stage-2 DiT (vlt's extension): K per batch from the data, K per image to sample.

Letters: B images, G grid levels (the K values of the allocation, ascending).

`vlt allocate` gives every cached image its own K_i over the nested merge levels and writes p(K | class).
Training: the datamodule buckets batches by K_i, so a step trains at its batch's one K (`batch_k`).
Sampling: each image draws its K from p(K | class) (or from p(K | class) tilted to a mean-K budget),
images of equal K are sampled together and put back in the order of the labels.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from vlt.adaptive.allocation import draw, tilt_to_budget
from vlt.adaptive.store import load_allocation
from vlt.models.dit import DiTConfig

KSource = Literal["cycle", "data"]
K_SOURCES: tuple[str, ...] = get_args(KSource)


class AdaptiveSamples(NamedTuple):
    """Images (B, 3, H, W) in [-1, 1] in the order of the labels, and the K (B,) each was sampled at."""

    images: Tensor
    ks: Tensor


def allocation_buffers(path: str | None, cfg: DiTConfig, ks: list[int]) -> tuple[Tensor, Tensor]:
    """p(K | class) (num_classes + 1, G) float32 (last row: all images) and the grid (G,) long.

    Checked against the model: the DiT must embed K (batches of different K share one network) and
    serve every K of the grid.
    """
    if not cfg.k_conditioning:
        raise ValueError(
            "k_source='data' trains one DiT on batches of different K, so the DiT must know K: set "
            "model.init_args.dit.k_conditioning=true (or use k_source='cycle')"
        )
    if path is None:
        raise ValueError("k_source='data' needs an allocation: set model.init_args.allocation or cache")
    meta = load_allocation(path)
    grid = [int(k) for k in meta["grid"]]
    probs = torch.tensor(meta["p_k_given_class"], dtype=torch.float32)  # (num_classes + 1, G)
    if not set(grid) <= set(ks):
        raise ValueError(f"allocation {path} uses K grid {grid}, not a subset of this DiT's ks {ks}")
    if probs.shape != (cfg.num_classes + 1, len(grid)):
        raise ValueError(
            f"allocation {path}: p_k_given_class is {tuple(probs.shape)}, expected "
            f"({cfg.num_classes + 1}, {len(grid)}) for num_classes={cfg.num_classes} and grid {grid}"
        )
    return probs, torch.tensor(grid, dtype=torch.long)


def batch_k(batch: dict) -> int:
    """The one K of a bucketed batch; a clear error when the batch has none or mixes several."""
    ks = batch["k"].unique().tolist()
    if len(ks) != 1 or ks[0] < 0:
        raise ValueError(
            f"k_source='data' needs batches of one allocated K, got K values {ks} (-1: none): set "
            "data.init_args.allocation to the allocation.json of `vlt allocate` so batches are "
            "bucketed by K"
        )
    return int(ks[0])


class AdaptiveK:
    """Sampling with one K per image, mixed into `LitDiT` (uses its ks, k_source, generate, budget_flops).

    In k_source="data" the module holds the buffers `k_probs` (num_classes + 1, G) and `k_grid` (G,).
    """

    def choose_ks(
        self, labels: Tensor, budget: float | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """K per image (B,) long on CPU: drawn from p(K | class), tilted to a mean-K budget if given.

        k_source="data" uses the allocation's p(K | class) (labels outside the classes use the
        all-images row); "cycle" has no such prior and uses a uniform one over `ks`, so any DiT
        can sample at a budget. Draws are stratified (`vlt.adaptive.allocation.draw`), so the batch's
        mean K follows the budget closely instead of fluctuating like independent draws.
        """
        labels = labels.cpu().long()
        if self.k_source == "data":
            grid, rows = self.k_grid.tolist(), self.k_probs.cpu().double()  # (num_classes + 1, G)
            known = (labels >= 0) & (labels < self.dit.cfg.num_classes)
            p = rows[torch.where(known, labels, torch.full_like(labels, rows.shape[0] - 1))]  # (B, G)
        else:
            grid = self.ks
            p = torch.full((len(labels), len(grid)), 1.0 / len(grid), dtype=torch.float64)  # (B, G)
        if budget is not None:
            p, _ = tilt_to_budget(p, grid, float(budget))
        if generator is not None and generator.device.type != "cpu":  # draws run on the CPU
            seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
            generator = torch.Generator().manual_seed(int(seed))
        return draw(p, grid, generator)

    @torch.no_grad()
    def generate_adaptive(
        self,
        labels: Tensor,
        budget: float | None = None,
        cfg_scale: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> AdaptiveSamples:
        """Images at one K per image (see `choose_ks`): each K's group is sampled at that K, in order."""
        ks = self.choose_ks(labels, budget, generator)  # (B,)
        images: Tensor | None = None
        for k in ks.unique().tolist():
            index = (ks == k).nonzero().squeeze(1)  # (B_k,)
            group = self.generate(
                labels[index.to(labels.device)], k, cfg_scale=cfg_scale, steps=steps, generator=generator
            )  # (B_k, 3, H, W)
            if images is None:
                images = group.new_empty((len(ks), *group.shape[1:]))
            images[index.to(images.device)] = group
        return AdaptiveSamples(images, ks)

    # --- the token-budget protocol at a mean-K budget (vlt.callbacks) ---
    def budget_generate_adaptive(
        self, labels: Tensor, budget: float, cfg_scale: float, generator: torch.Generator | None = None
    ) -> AdaptiveSamples:
        return self.generate_adaptive(labels, budget, cfg_scale=cfg_scale, generator=generator)

    def budget_flops_per_k(self, k: int, cfg_scale: float) -> float:
        """FLOPs of one image generated at K; a budget's cost is its mean over the chosen ks."""
        return self.budget_flops(k, "generate", cfg_scale)
