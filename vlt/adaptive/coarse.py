"""Per-image K decided while sampling: a curve predictor on the generator's own coarse state.

Letters: S training images, B batch, N slots, Kd tokens at the decision, C channels, G grid levels.

A class label says little about how busy an image will be, but a coarse-to-fine sampler has seen the
image form by the time it decides: at flow time `at` its clean prediction x1 = x_t + (1 - t) v of
the Kd coarse tokens already holds the layout. `CoarseDecider` reads those tokens with a
`CurvePredictor` (the stage-1 head of `vlt allocate`, here over Kd tokens instead of N slots), which
predicts the image's reconstruction PSNR at every K of the grid, and applies a rule: the smallest K
whose predicted PSNR reaches a floor, or the Lagrangian allocation of the batch to a mean budget.

`decision_inputs` makes its training set the way sampling will see it: cached latents of real images,
merged to Kd, noised to time `at` with pooled noise and denoised by the generator's DiT in one call.
The targets are the images' measured PSNR curves (`vlt cache-latents --distortion true`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vlt.adaptive.allocation import allocate, to_distortion
from vlt.adaptive.predictor import CurvePredictor, fit_predictor, load_predictor, save_predictor
from vlt.objectives.flow import pooled_noise


class CoarseDecider(nn.Module):
    """tokens (B, Kd, C) in the latent space -> final K (B,) long, by `floor` or by mean `budget`.

    Args:
        predictor: a `CurvePredictor` over Kd tokens; its grid is the set of K to choose from.
        floor: PSNR floor (dB): each image gets the smallest K predicted to reach it (else the largest).
        budget: mean K of each batch (Lagrangian allocation of the predicted curves, `distortion`, `cost`).
    """

    def __init__(
        self,
        predictor: CurvePredictor,
        *,
        floor: float | None = None,
        budget: float | None = None,
        cost: str = "k",
        distortion: str = "mse",
    ) -> None:
        super().__init__()
        if (floor is None) == (budget is None):
            raise ValueError("a decider needs exactly one rule: floor=<dB> or budget=<mean K>")
        self.predictor, self.floor, self.budget = predictor.eval(), floor, budget
        self.cost, self.distortion = cost, distortion

    @property
    def k(self) -> int:
        """Kd, the token count the decider reads."""
        return self.predictor.n_slots

    @torch.no_grad()
    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        curves = self.predictor(tokens.float()).double().cpu()  # (B, G) dB
        grid = self.predictor.grid
        if self.floor is not None:
            reached = curves >= self.floor  # (B, G)
            last = torch.full((len(curves),), len(grid) - 1)
            first = torch.where(reached.any(1), reached.double().argmax(1), last)
            return torch.as_tensor(grid)[first]
        ks, _ = allocate(to_distortion(curves, self.distortion), grid, float(self.budget), self.cost)
        return ks.long()


@torch.no_grad()
def decision_inputs(
    generator: nn.Module, z: Tensor, labels: Tensor, k: int, at: float, *, batch_size: int = 256,
    seed: int = 0,
) -> Tensor:  # fmt: skip
    """The generator's clean prediction (S, Kd, C), latent space, of latents z (S, N, C) merged to K=k
    and noised to flow time `at` (pooled noise drawn from `seed`), with their labels (S,)."""
    device = generator.latent_mean.device
    rng = torch.Generator(device).manual_seed(seed)
    gbar, sizes = generator.pattern.gbar(k).to(device), generator.pattern.sizes(k).to(device)
    out = []
    for i in range(0, len(z), batch_size):
        zb = z[i : i + batch_size].to(device).float()  # (B, N, C)
        x1 = generator.normalise(generator.pattern.merge(zb, k))  # (B, Kd, C)
        eps = pooled_noise(len(x1), gbar, x1.shape[2], rng)  # (B, Kd, C)
        x_t = at * x1 + (1 - at) * eps
        t = torch.full((len(x1),), at, device=device)
        y = generator.labels(labels[i : i + batch_size].to(device))
        out.append(generator.denormalise(x_t + (1 - at) * generator.dit(x_t, t, y, gbar, sizes)).cpu())
    return torch.cat(out)


def fit_decider_predictor(
    generator: nn.Module, z: Tensor, labels: Tensor, psnr: Tensor, grid: list[int], *, k: int, at: float,
    path: str | Path | None = None, steps: int = 1000, width: int = 128, seed: int = 0,
) -> CurvePredictor:  # fmt: skip
    """A `CurvePredictor` over the Kd = k tokens the sampler sees at `at`, trained on cached latents z
    (S, N, C), labels (S,) and PSNR curves psnr (S, G) over `grid`; reused from `path` when it was
    trained on the same data and settings. The grid holds the choices, so no K below k (tokens never merge
    back while sampling)."""
    if min(grid) < k:
        below = [g for g in grid if g < k]
        raise ValueError(f"a decision at K={k} tokens chooses among K >= {k}; drop {below} from grid")
    fingerprint = {
        "grid": [int(g) for g in grid], "k": int(k), "at": float(at), "samples": len(z), "steps": steps,
        "width": width, "seed": seed, "psnr_sum": round(float(psnr.double().sum()), 3),
    }  # fmt: skip
    model = load_predictor(path, fingerprint) if path is not None else None
    if model is None:
        torch.manual_seed(seed)
        inputs = decision_inputs(generator, z, labels, k, at, seed=seed)  # (S, Kd, C)
        model = CurvePredictor(n_slots=k, channels=inputs.shape[2], grid=list(grid), width=width)
        fit_predictor(model, inputs, psnr, steps=steps, seed=seed)
        if path is not None:
            save_predictor(path, model, fingerprint)
    return model.eval()
