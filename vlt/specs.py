"""Typed argument groups of the Lightning systems (the YAML schema of `model.init_args`).

Each dataclass mirrors the keyword arguments of one pure-torch piece, so a config reads as
`merge: {mode: lgm, grid: [4, 8, 16, 32]}` while checkpoints stay loadable without the CLI
(`save_hyperparameters` stores plain dataclasses). This module imports no Lightning, so
`vlt.load` can read a checkpoint's hyper-parameters without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from torch import nn, optim

from vlt.models.merging import MergeMode


@dataclass
class MergeSpec:
    """Arguments of `vlt.models.merging.Merger` (minus N and C, taken from the tokenizer) + the K policy.

    Args:
        full_k_fraction: the first fraction of training steps runs at K = N (no merge, no drop). Merging
            from step 0 rewards redundant slots and collapsed the tiny recipe; the paper merges throughout
            (0.0) at scale.
    """

    mode: MergeMode = "lgm"
    grid: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    grid_weights: list[float] | None = None
    embed_dim: int = 64
    noise: float = 0.1
    blocks: int = 1
    tau: float = 0.1
    margin: float = 0.25
    fixed_k: int | None = None
    init_std: float = 0.02
    full_k_fraction: float = 0.4

    def merger_kwargs(self) -> dict:
        kwargs = asdict(self)
        kwargs.pop("full_k_fraction")
        return kwargs


@dataclass
class LossSpec:
    """Weights of `vlt.objectives.recon.ReconLoss` and the optional stage-1 GAN terms
    (`vlt.objectives.adversarial.AdversarialLoss`).

    Args:
        adversarial: generator weight of the DINO-discriminator hinge loss (0: no discriminator is built).
        disc_weights: local state dict of the frozen backbone (`vlt.models.dino.DinoViT`, DINO key layout).
        disc_size: its size, a `vlt.models.dino.DINO_SIZES` name ("s": ViT-S, "b": ViT-B).
        disc_image_size: side the images are resized to before the backbone.
        disc_start: first step with the adversarial terms (the reference: 20000).
        disc_adaptive: scale the generator weight by VQGAN's ratio of last-layer gradient norms.
        lecam: weight of the LeCam regulariser in the discriminator loss (the reference: 0.001).
    """

    l2: float = 1.0
    kl: float = 1e-6
    align: float = 0.25
    perceptual: float = 0.0
    perceptual_weights: str | None = None
    adversarial: float = 0.0
    disc_weights: str | None = None
    disc_size: Literal["tiny", "s", "b"] = "s"
    disc_image_size: int = 224
    disc_start: int = 0
    disc_adaptive: bool = False
    lecam: float = 0.0

    def recon_kwargs(self) -> dict:
        """The `ReconLoss` arguments."""
        names = ("l2", "kl", "align", "perceptual", "perceptual_weights")
        return {name: getattr(self, name) for name in names}

    def adversarial_kwargs(self) -> dict:
        """The `AdversarialLoss` arguments (meaningful when `adversarial` > 0)."""
        return {
            "weight": self.adversarial, "backbone_path": self.disc_weights, "size": self.disc_size,
            "image_size": self.disc_image_size, "start": self.disc_start, "lecam": self.lecam,
            "adaptive": self.disc_adaptive,
        }  # fmt: skip


@dataclass
class LoRASpec:
    """Stage 2 as "a DiT per K": train only the low-rank adapters of one K on a frozen base DiT.

    Args:
        k: the K whose adapters are trained (every step runs at this K; other K run the base).
        base: a stage-2 checkpoint or generator export (`vlt export`, `vlt convert`) whose DiT weights
            are the frozen base, read at fit start (None: the base is whatever the DiT starts with).
        rank, alpha: adapter rank R and scale numerator (update scale alpha / R; the reference: 32, 32).
    """

    k: int
    base: str | None = None
    rank: int = 32
    alpha: float = 32.0


@dataclass
class OptimSpec:
    """AdamW with linear warm-up and cosine decay to `min_lr_ratio * lr` over `trainer.max_steps`."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05

    def build(self, params, total_steps: int) -> dict:
        """Optimizer + per-step scheduler in Lightning's `configure_optimizers` format."""
        opt = optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        warmup, total = self.warmup_steps, max(total_steps, self.warmup_steps + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / (total - warmup))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@dataclass
class JointSpec:
    """Loss weights and knobs of the stage-3 joint step.

    Args:
        diffusion, align, recon: loss weights (REPA-E uses 1.0 / 0.5 / 1.0).
        align_depth: DiT block whose output is aligned (None: max(1, depth // 2)).
        projector_hidden: hidden width of the projector MLP.
        bn_momentum: momentum of the running latent statistics (BatchNorm's convention).
    """

    diffusion: float = 1.0
    align: float = 0.5
    recon: float = 1.0
    align_depth: int | None = None
    projector_hidden: int = 2048
    bn_momentum: float = 0.1


@dataclass
class PartLR:
    """Peak learning rate per part of the joint fine-tune; None takes `optim.lr`, 0 freezes the part."""

    tokenizer: float | None = None
    dit: float | None = None
    projector: float | None = None


@dataclass
class AlignEncoderSpec:
    """The frozen alignment target. kind "stage1": a frozen copy of the initial stage-1 encoder
    (`features` hidden or latent); kind "file": a `torch.jit` encoder at `path` (see FileFeatures)."""

    kind: Literal["stage1", "file"] = "stage1"
    features: Literal["hidden", "latent"] = "hidden"
    path: str | None = None
    image_size: int | None = None


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings (tensors with < 2 dims)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
