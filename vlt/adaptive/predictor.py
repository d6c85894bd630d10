"""A single-pass predictor of the distortion curve: slot latents in, PSNR at every grid K out.

Letters: B images, N slots, C channels, G grid levels, W head width, S cached samples.

Searching K_i needs G decodes per image; at inference we only have the encoder's one pass. The head
reads the full slot latents z (B, N, C), which are exactly what the encoder produces and what the
cache holds, and predicts the whole PSNR curve (B, G) instead of one K, so any lambda, budget, cost
or rule can be applied to its output afterwards.

Two inputs feed the head: the standardised latents flattened (slots are ordered learned queries,
so slot identity matters), and, when a merge table is given, the log mean squared residual of
merging z at each K (z minus its cluster means): the latent-space counterpart of the pixel error the
curve measures, which is cheap because the pattern is global. The output is monotone non-decreasing
in K by construction (first level plus a cumulative sum of softplus increments).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vlt import console
from vlt.data.cache import LatentCache
from vlt.models.pattern import MergePattern


class CurvePredictor(nn.Module):
    """z (B, N, C) -> predicted PSNR dB (B, G), non-decreasing along G.

    Args:
        n_slots, channels: N and C of the latents.
        grid: the G token counts of the curve, ascending.
        width: hidden width W.
        table: the global merge pattern; adds per-K merge-residual features when given.
    """

    def __init__(
        self,
        *,
        n_slots: int,
        channels: int,
        grid: list[int],
        width: int = 64,
        table: MergePattern | None = None,
    ) -> None:
        super().__init__()
        self.n_slots, self.channels, self.grid, self.width = n_slots, channels, list(grid), width
        g = len(self.grid)
        # Cluster-mean operators P_K = Gamma Gbar^T (N, N): P_K z replaces each slot by its cluster's mean.
        ops = [table.gamma(k) @ table.gbar(k).T for k in self.grid] if table is not None else []
        self.register_buffer("ops", torch.stack(ops) if ops else torch.zeros(0, n_slots, n_slots))
        self.register_buffer("z_mean", torch.zeros(channels))
        self.register_buffer("z_std", torch.ones(channels))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))
        self.latent = nn.Sequential(nn.Linear(n_slots * channels, width), nn.GELU())
        self.head = nn.Sequential(nn.Linear(width + self.ops.shape[0], width), nn.GELU(), nn.Linear(width, g))

    def fit_normalisation(self, z: Tensor, y: Tensor) -> None:
        """Set input (per channel) and output (scalar) standardisation from training data."""
        self.z_mean.copy_(z.float().mean(dim=(0, 1)))
        self.z_std.copy_(z.float().std(dim=(0, 1)).clamp_min(1e-6))
        self.y_mean.copy_(y.float().mean())
        self.y_std.copy_(y.float().std().clamp_min(1e-6))

    def features(self, z: Tensor) -> Tensor:
        """(B, N, C) -> (B, W + G') with G' = G when a table was given, else 0."""
        zs = (z.float() - self.z_mean) / self.z_std  # (B, N, C)
        parts = [self.latent(zs.flatten(1))]  # (B, W)
        if self.ops.shape[0]:
            merged = torch.einsum("gnm,bmc->bgnc", self.ops, zs)  # (B, G, N, C)
            residual = (zs[:, None] - merged).square().mean(dim=(2, 3))  # (B, G)
            parts.append(torch.log(residual + 1e-4))
        return torch.cat(parts, dim=1)

    def normalised(self, z: Tensor) -> Tensor:
        """The curve in standardised units (B, G): level 0 plus cumulative non-negative steps."""
        raw = self.head(self.features(z))  # (B, G)
        steps = nn.functional.softplus(raw[:, 1:])  # (B, G-1)
        return torch.cat([raw[:, :1], raw[:, :1] + steps.cumsum(dim=1)], dim=1)  # (B, G)

    def forward(self, z: Tensor) -> Tensor:
        return self.y_mean + self.y_std * self.normalised(z)  # (B, G) dB

    def config(self) -> dict:
        return {"n_slots": self.n_slots, "channels": self.channels, "grid": self.grid, "width": self.width}


def fit_predictor(
    model: CurvePredictor,
    z: Tensor,
    y: Tensor,
    *,
    steps: int = 1000,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    shape_weight: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Train the head post hoc on cached latents z (S, N, C) and their curves y (S, G) in dB.

    AdamW, cosine learning-rate decay; seconds on a CPU for a few thousand images. The loss is the
    squared error of the curve in standardised units plus `shape_weight` times the squared error of
    its increments in units of their own spread: allocation depends on the slopes between levels,
    which are small beside the spread of PSNR levels across images and would otherwise be ignored.
    Returns the per-step training losses.
    """
    model.fit_normalisation(z, y)
    target = (y.float() - model.y_mean) / model.y_std  # (S, G)
    rise = target.diff(dim=1)  # (S, G-1)
    rise_scale = rise.std().clamp_min(1e-6) if rise.numel() > 1 else torch.ones(())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in console.progress(range(steps), desc="allocate: curve predictor step"):
        idx = torch.randint(len(z), (min(batch_size, len(z)),), generator=generator)  # (B,)
        curve = model.normalised(z[idx])  # (B, G)
        loss = (curve - target[idx]).square().mean()
        if rise.numel():
            loss = loss + shape_weight * ((curve.diff(dim=1) - rise[idx]) / rise_scale).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def predict(model: CurvePredictor, z: Tensor, batch_size: int = 1024) -> Tensor:
    """Predicted curves (S, G) for latents (S, N, C), in batches, eval mode."""
    model.eval()
    return torch.cat([model(z[i : i + batch_size]) for i in range(0, len(z), batch_size)])


def save_predictor(path: str | Path, model: CurvePredictor, fingerprint: dict) -> Path:
    """Weights, constructor config and the fingerprint of the data it was trained on."""
    torch.save({"config": model.config(), "state_dict": model.state_dict(), "fingerprint": fingerprint}, path)
    return Path(path)


def load_predictor(path: str | Path, fingerprint: dict) -> CurvePredictor | None:
    """The saved predictor when it exists and was trained on data with this fingerprint, else None."""
    path = Path(path)
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint:
        return None
    model = CurvePredictor(**saved["config"])
    # The operator buffer's size depends on whether a table was given: size it before loading.
    model.ops = torch.empty_like(saved["state_dict"]["ops"])
    model.head[0] = nn.Linear(model.width + model.ops.shape[0], model.width)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def read_latents(cache: str | Path, split: str, keys: list[str]) -> Tensor:
    """Cached full latents (S, N, C) of one split, in the order of `keys` (all ranks' shards)."""
    found: dict[str, np.ndarray] = {}
    for shard in LatentCache(cache).shard_files(split):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".latent.npy"):
                    key = member.name[: -len(".latent.npy")]
                    found[key] = np.load(io.BytesIO(tar.extractfile(member).read()))
    missing = [k for k in keys if k not in found]
    if missing:
        raise KeyError(f"{len(missing)} curve keys of {split!r} have no cached latent, e.g. {missing[:3]}")
    return torch.from_numpy(np.stack([found[k] for k in keys]))


def predicted_curves(
    cache: str | Path, curves: dict, *, steps: int = 1000, width: int = 128, seed: int = 0
) -> tuple[dict[str, Tensor], dict]:
    """Predicted PSNR curves {split: (S, G)} for a cache's splits, from a head trained on its train split.

    Reuses <cache>/predictor.pt when its fingerprint (grid, train curves, training settings) matches,
    otherwise trains and saves one. Returns the curves and a report (held-out RMSE against the
    constant mean-curve baseline, whether it trained, the final loss).
    """
    root, train = Path(cache), curves["train"]
    table = LatentCache(root).pattern() if LatentCache(root).has_pattern() else None
    fingerprint = {
        "grid": [int(k) for k in train.grid],
        "train_samples": len(train.keys),
        "train_psnr_sum": round(float(np.asarray(train.psnr, dtype=np.float64).sum()), 3),
        "steps": steps,
        "width": width,
        "seed": seed,
        "table": table.to_dict() if table is not None else None,
    }
    z = {split: read_latents(root, split, c.keys) for split, c in curves.items()}  # (S, N, C) each
    path = root / "predictor.pt"
    model, losses = load_predictor(path, fingerprint), []
    if model is None:
        torch.manual_seed(seed)
        n, c = z["train"].shape[1:]
        model = CurvePredictor(n_slots=n, channels=c, grid=train.grid, width=width, table=table)
        losses = fit_predictor(model, z["train"], torch.as_tensor(train.psnr), steps=steps, seed=seed)
        save_predictor(path, model, fingerprint)
    pred = {split: predict(model, zs) for split, zs in z.items()}
    report = {"path": str(path), "trained": bool(losses), "final_loss": losses[-1] if losses else None}
    mean_curve = torch.as_tensor(train.psnr).double().mean(0)  # (G,)
    for split, c in curves.items():
        true = torch.as_tensor(c.psnr).double()  # (S, G)
        report[f"{split}_rmse_db"] = float((pred[split].double() - true).square().mean().sqrt())
        report[f"{split}_rmse_constant_db"] = float((mean_curve - true).square().mean().sqrt())
    return pred, report
