"""Stage-1 reconstruction objective: L2 + KL + alignment + an optional LPIPS-like perceptual term.

Letters: B batch, C channels (image or feature), H, W spatial size.

The perceptual term needs trained feature weights. Nothing is downloaded: the weights come from a
local file (a `state_dict` of `PerceptualNet`), and asking for the term without that file is an
error at construction, not a silent zero. The feature net is kept out of `state_dict()` so it never
lands in model checkpoints; it follows the input's device on first use.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak range 2).

    Both inputs are clamped to [-1, 1] first, as a saved or displayed image would be.

    Args:
        x, y: (B, C, H, W) images in [-1, 1].

    Returns:
        (B,) float32 PSNR; 100 dB caps identical images instead of returning inf.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    diff = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2  # (B, C, H, W) in [0, 1] units
    mse = diff.square().flatten(1).mean(dim=1)  # (B,)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp_max(100.0)


class PerceptualNet(nn.Module):
    """A small VGG-like feature net with LPIPS-style distance.

    distance(x, y) = sum over stages of mean_hw || w_s * (f_s(x)/|f_s(x)| - f_s(y)/|f_s(y)|) ||^2,
    where f_s are the stage features (unit-normalised over channels) and w_s >= 0 learned channel
    weights. The file at `perceptual_weights` holds this module's state_dict.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        stages, lins, c_in = [], [], 3
        for i, c in enumerate(channels):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(c, c, 3, padding=1),
                    nn.ReLU(),
                )
            )
            lins.append(nn.Conv2d(c, 1, 1, bias=False))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.lins = nn.ModuleList(lins)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] -> (B,) distance."""
        h = torch.cat([x, y])  # (2B, 3, H, W): one pass for both
        total = x.new_zeros(x.shape[0])
        for stage, lin in zip(self.stages, self.lins):
            h = stage(h)  # (2B, C, H', W')
            fx, fy = F.normalize(h, dim=1).chunk(2)
            diff = (fx - fy).pow(2)  # (B, C, H', W')
            total = total + F.conv2d(diff, lin.weight.abs()).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_file(cls, path: str | Path) -> PerceptualNet:
        """Load a frozen net from a local state_dict file."""
        net = cls()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval().requires_grad_(False)

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)


def _missing_weights(weight: float, path: str | None) -> str:
    where = "no file was given" if path is None else f"{path} does not exist"
    return (
        f"perceptual loss weight {weight} needs a local weights file, but {where}. Expected a torch "
        "state_dict of vlt.objectives.recon.PerceptualNet (write one with PerceptualNet.save), placed "
        "e.g. at weights/perceptual.pt and passed as model.init_args.loss.perceptual_weights=<path>; or set "
        "model.init_args.loss.perceptual=0."
    )


class ReconLoss(nn.Module):
    """Weighted sum of the stage-1 terms; returns every part for logging.

    Args:
        l2: weight of the pixel MSE.
        kl: weight of the bottleneck KL (per image, summed over slots and channels).
        align: weight of the merge alignment loss.
        perceptual: weight of the LPIPS-like term; > 0 requires `perceptual_weights`.
        perceptual_weights: local path of a `PerceptualNet` state_dict.
    """

    def __init__(
        self,
        *,
        l2: float = 1.0,
        kl: float = 1e-6,
        align: float = 0.25,
        perceptual: float = 0.0,
        perceptual_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.l2, self.kl, self.align, self.perceptual = l2, kl, align, perceptual
        self._net: list[PerceptualNet] = []  # a list hides it from state_dict and checkpoints
        if perceptual > 0:
            if perceptual_weights is None or not Path(perceptual_weights).is_file():
                raise ValueError(_missing_weights(perceptual, perceptual_weights))
            self._net.append(PerceptualNet.from_file(perceptual_weights))

    def perceptual_distance(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """(B,) LPIPS-like distance; gradients flow to x_hat, never to the frozen net."""
        net = self._net[0]
        if next(net.parameters()).device != x.device:
            net.to(x.device)
        return net(x_hat, x.detach())

    def forward(self, x: Tensor, x_hat: Tensor, *, kl: Tensor, align: Tensor) -> dict[str, Tensor]:
        """x, x_hat: (B, 3, H, W); kl, align: scalars -> dict(loss, l2, kl, align, perceptual)."""
        l2 = F.mse_loss(x_hat.float(), x.float())
        perc = self.perceptual_distance(x, x_hat).mean() if self._net else l2.new_zeros(())
        kl, align = kl.float(), align.float()
        loss = self.l2 * l2 + self.kl * kl + self.align * align + self.perceptual * perc
        return {"loss": loss, "l2": l2, "kl": kl, "align": align, "perceptual": perc}
