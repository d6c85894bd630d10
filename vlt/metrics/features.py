"""vltnet: the project's own feature net, trained on the embedded data's known factors (`vlt features`).

Letters: B batch, H/W height/width, F feature dimension (the embedding), P training photos.

A random conv net (`ProxyExtractor`) tracks colour and blur but hardly shapes or classes. vltnet is a
small CNN trained, multi-task, to read what the embedded recipes know about each image (see
`vlt.metrics.features_data`): the background hue class, shape count, count of each shape kind and
where shapes lie for synthetic images; source photo and crop scale for photo crops. Every head is
linear on one low-dimensional embedding (F = 32 by default), so the embedding itself carries those
factors and its covariance is well conditioned at a few hundred samples. The embedding is
standardised with the training pool's statistics; distances on it are named `*_vltnet`, never FID.

The build is deterministic from its seed (same machine and thread count: same bytes), takes about two
minutes on 2 CPU cores, and writes `<out>/vltnet-<hash>.pt` (hash of the weights and recipe; loaded
with `weights_only=True` and checked against its name) plus `<out>/LATEST` naming it. Nothing is
downloaded; the file is never put inside model checkpoints (the budget callback owns it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlt.data.synthetic import N_CLASSES, SHAPES
from vlt.metrics import features_data

DEFAULT_DIR = "data/features"
LATEST = "LATEST"
MAX_SHAPES = 10


@dataclass(frozen=True)
class VltNetConfig:
    """Architecture and training recipe; part of the content hash."""

    widths: tuple[int, ...] = (16, 32, 64, 64)
    dim: int = 32
    size: int = 32
    n_photos: int = 8  # training photos (source classes 1..P)
    steps: int = 1200
    batch_size: int = 96
    lr: float = 3e-3
    n_synthetic_pool: int = 12000
    n_photo_pool: int = 6000
    seed: int = 0


class VltNet(nn.Module):
    """Conv stages (stride 2 after the first) -> pooled last two stages -> MLP -> embedding (F).

    `forward` gives the standardised embedding (the metric features); `heads` gives every task's
    output; `classify` the hue-class logits (class consistency of class-conditional samples).
    """

    def __init__(self, config: VltNetConfig = VltNetConfig()) -> None:
        super().__init__()
        self.config = config
        widths = (3, *config.widths)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(min(8, c_out // 4), c_out),
                nn.GELU(),
                *(
                    ()
                    if i == 0  # full resolution: one conv keeps the build within minutes
                    else (
                        nn.Conv2d(c_out, c_out, 3, padding=1),
                        nn.GroupNorm(min(8, c_out // 4), c_out),
                        nn.GELU(),
                    )
                ),
            )
            for i, (c_in, c_out) in enumerate(itertools.pairwise(widths))
        )
        pooled = config.widths[-1] + config.widths[-2]
        self.mlp = nn.Sequential(nn.Linear(pooled, 128), nn.GELU(), nn.Linear(128, config.dim))
        outputs = {
            "hue": N_CLASSES,
            "count": MAX_SHAPES + 1,
            "kinds": len(SHAPES),
            "cells": features_data.GRID**2,
            "source": 1 + config.n_photos,
            "scale": 1,
        }
        self.head = nn.ModuleDict({name: nn.Linear(config.dim, n) for name, n in outputs.items()})
        self.register_buffer("shift", torch.zeros(config.dim))
        self.register_buffer("scale", torch.ones(config.dim))
        self.name = "vltnet"
        self.num_features = config.dim

    def embed(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> raw embedding (B, F)."""
        x = images.float()
        if x.shape[-2:] != (self.config.size, self.config.size):
            x = F.interpolate(x, size=(self.config.size,) * 2, mode="bilinear", antialias=True)
        pooled = []
        for stage in self.stages:
            x = stage(x)  # (B, C_s, H_s, W_s)
            pooled.append(x.mean(dim=(-2, -1)))  # (B, C_s)
        return self.mlp(torch.cat(pooled[-2:], dim=1))  # (B, F)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> standardised features (B, F) float32."""
        return (self.embed(images) - self.shift) / self.scale

    def heads(self, embedding: Tensor) -> dict[str, Tensor]:
        """Raw embedding (B, F) -> {task: (B, outputs)}."""
        return {name: head(embedding) for name, head in self.head.items()}

    def classify(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> hue-class logits (B, 10)."""
        return self.head["hue"](self.embed(images))


def _to_images(pixels: np.ndarray) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


def multitask_loss(net: VltNet, batch: dict[str, np.ndarray]) -> Tensor:
    """Sum of the task losses on the images that have each target (-1 / NaN: absent)."""
    out = net.heads(net.embed(_to_images(batch["images"])))
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if k != "images"}
    synthetic, photo = t["hue"] >= 0, t["source"] > 0
    loss = F.cross_entropy(out["source"], t["source"])
    if synthetic.any():
        loss = loss + F.cross_entropy(out["hue"][synthetic], t["hue"][synthetic])
        loss = loss + F.cross_entropy(out["count"][synthetic], t["count"][synthetic])
        loss = loss + F.mse_loss(out["kinds"][synthetic], t["kinds"][synthetic].float() / 2)
        loss = loss + 4 * F.mse_loss(out["cells"][synthetic], t["cells"][synthetic].float())
    if photo.any():
        scale = (t["scale"][photo].float() + 1.39) / 0.4  # log side fraction, about unit variance
        loss = loss + F.mse_loss(out["scale"][photo, 0], scale)
    return loss


def train_vltnet(config: VltNetConfig, *, log_every: int = 200) -> VltNet:
    """Build the pool, train the multi-task net, set the embedding's standardisation; deterministic."""
    pool = features_data.build_pool(
        config.n_synthetic_pool, config.n_photo_pool, seed=config.seed, size=config.size
    )
    rng = np.random.default_rng([config.seed, 7])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = VltNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    net.train()
    for step in range(config.steps):
        index = rng.integers(0, len(pool), config.batch_size)
        flips = rng.random((2, config.batch_size)) < 0.5
        loss = multitask_loss(net, features_data.flip(pool, index, flips[0], flips[1]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == config.steps - 1):
            print(f"vltnet step {step}: loss {loss.item():.3f}", flush=True)
    net.eval()
    with torch.no_grad():
        raw = torch.cat([net.embed(_to_images(pool.images[i : i + 512])) for i in range(0, len(pool), 512)])
        net.shift.copy_(raw.mean(0))
        net.scale.copy_(raw.std(0).clamp_min(1e-6))
    net.requires_grad_(False)
    return net


def holdout_accuracy(net: VltNet, n: int = 512) -> dict[str, float]:
    """Hue-class, shape-count and photo-source accuracy on synthetic images and crops outside the pool."""
    config = net.config
    # Seed namespace [seed + 1, 2, i]: images the pool (seed) never drew.
    pool = features_data.build_pool(n, n, seed=config.seed + 1, size=config.size)
    with torch.no_grad():
        out = net.heads(net.embed(_to_images(pool.images)))
    synthetic = pool.hue >= 0
    pick = {name: out[name].argmax(1).numpy() for name in ("hue", "count", "source")}
    return {
        "hue": float((pick["hue"] == pool.hue)[synthetic].mean()),
        "count": float((pick["count"] == pool.count)[synthetic].mean()),
        "count_within_1": float((np.abs(pick["count"] - pool.count) <= 1)[synthetic].mean()),
        "source": float((pick["source"] == pool.source).mean()),
    }


def content_hash(state: dict[str, Tensor], config: VltNetConfig) -> str:
    """sha256 over the recipe and every tensor's name, shape and bytes (first 12 hex digits)."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:12]


def save_vltnet(net: VltNet, out: str | Path) -> Path:
    """Write `<out>/vltnet-<hash>.pt` (tensors + recipe, no pickled classes) and `<out>/LATEST`."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    digest = content_hash(state, net.config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"vltnet-{digest}.pt"
    torch.save({"state_dict": state, "config": asdict(net.config)}, path)
    (folder / LATEST).write_text(path.name + "\n")
    return path


def resolve(path: str | Path = DEFAULT_DIR) -> Path:
    """A vltnet file: `path` itself, or in a folder the file its LATEST names (else its only file)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    found = sorted(path.glob("vltnet-*.pt")) if path.is_dir() else []
    if len(found) != 1:
        raise ValueError(
            f"no vltnet feature net at {path} ({len(found)} vltnet-*.pt files, no {LATEST}): build it with "
            f"`vlt features --out {path}` (or `make data`), about two minutes on 2 CPU cores"
        )
    return found[0]


def load_vltnet(path: str | Path = DEFAULT_DIR) -> VltNet:
    """Load (weights_only) and verify the content hash in the file name; eval mode, no gradients."""
    file = resolve(path)
    blob = torch.load(file, map_location="cpu", weights_only=True)
    config = VltNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in blob["config"].items()})
    digest = content_hash(blob["state_dict"], config)
    if file.stem != f"vltnet-{digest}":
        raise ValueError(f"{file} holds weights with hash {digest}: the file is damaged or renamed")
    net = VltNet(config)
    net.load_state_dict(blob["state_dict"])
    net.name = f"vltnet-{digest}"
    net.requires_grad_(False)
    return net.eval()


def features(
    out: str = DEFAULT_DIR, seed: int = 0, steps: int = VltNetConfig.steps, dim: int = VltNetConfig.dim
) -> str:
    """Train vltnet, the project's feature net for `*_vltnet` metrics, on the embedded recipes (no download).

    Deterministic from the seed on one machine; about two minutes on 2 CPU cores. Prints one summary
    line and returns the written file (`<out>/vltnet-<hash>.pt`, also named in `<out>/LATEST`).

    Args:
        out: output folder (git-ignored).
        seed: seed of the training pool, initialisation and batch order.
        steps: optimizer steps.
        dim: embedding (feature) dimension.
    """
    start = time.perf_counter()
    net = train_vltnet(VltNetConfig(seed=seed, steps=steps, dim=dim))
    path = save_vltnet(net, out)
    seconds = time.perf_counter() - start
    accuracy = ", ".join(f"{k} {v:.3f}" for k, v in holdout_accuracy(net).items())
    print(f"features: {path} ({net.num_features} features), {seconds:.0f} s; held-out accuracy: {accuracy}")
    return str(path)
