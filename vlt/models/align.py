"""Representation alignment (REPA): a projector, frozen target encoders and the alignment loss.

Letters: B batch, N latent slots, K merged tokens, D DiT width, F target feature width,
T tokens of an external encoder, H/W image height/width.

The joint fine-tune aligns the DiT's hidden tokens with features of a frozen encoder that are
merged with the same global pattern (Gbar^T f, one target per merged token). Target encoders map
images (B, 3, H, W) in [-1, 1] to per-slot features (B, N, F); they never train and stay in eval
mode whatever mode their parent is switched to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlt.models.tokenizer import Tokenizer, TokenizerConfig

SlotFeatureKind = Literal["hidden", "latent"]
SLOT_FEATURE_KINDS: tuple[str, ...] = ("hidden", "latent")


class Projector(nn.Module):
    """3-layer SiLU MLP from DiT width D to target width F (REPA's projector), applied per token."""

    def __init__(self, *, width: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)  # (B, K, D) -> (B, K, F)


def alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Negative cosine similarity per token, averaged: pred, target (B, K, F) -> scalar in [-1, 1].

    The target is detached: the frozen encoder defines where the representation should go.
    """
    return -F.cosine_similarity(pred.float(), target.detach().float(), dim=-1).mean()


@contextmanager
def frozen_params(*modules: nn.Module) -> Iterator[None]:
    """Run a block with the modules' parameters out of autograd, then restore their flags.

    Ops recorded inside keep gradients flowing to their *inputs* but never to these parameters:
    how the tokenizer gets the alignment gradient through a DiT pass that does not train the DiT.
    """
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Frozen(nn.Module):
    """Base of the target encoders: no gradients, always eval mode."""

    def train(self, mode: bool = True) -> _Frozen:
        return super().train(False)


class SlotFeatures(_Frozen):
    """A frozen copy of a stage-1 tokenizer's encoder: images -> its slot features (B, N, F).

    Args:
        cfg: the tokenizer config (the copy is rebuilt from it, so a checkpoint restores it).
        features: "hidden" = the encoder's last hidden slot states (F = width, richer, the default);
            "latent" = the slot latents z after the bottleneck (F = C).
    """

    def __init__(self, cfg: TokenizerConfig, *, features: SlotFeatureKind = "hidden") -> None:
        super().__init__()
        if features not in SLOT_FEATURE_KINDS:
            raise ValueError(f"unknown slot features {features!r}; choose one of {SLOT_FEATURE_KINDS}")
        self.features = features
        self.net = Tokenizer(cfg).requires_grad_(False)
        self.width = cfg.width if features == "hidden" else cfg.channels
        self.eval()

    def copy_from(self, tokenizer: Tokenizer) -> None:
        """Take the weights of a (trained) tokenizer; they stay fixed from then on."""
        self.net.load_state_dict(tokenizer.state_dict())

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self.features == "latent":
            return self.net.encode(images).z  # (B, N, C)
        captured: list[Tensor] = []
        hook = self.net.bottleneck.register_forward_hook(lambda m, args, out: captured.append(args[0]))
        try:
            self.net.encode(images)
        finally:
            hook.remove()
        return captured[0]  # (B, N, D) the slot states entering the bottleneck


class FileFeatures(_Frozen):
    """A pretrained vision encoder from a local `torch.jit` file, with a fixed adapter to N tokens.

    The scripted module takes images (B, 3, S, S) in [-1, 1] (its own normalisation inside) and
    returns patch features (B, T, F), a feature map (B, F, h, w) or a global vector (B, F). The
    adapter resizes the images to `image_size` and average-pools the raster-ordered tokens to N
    (slot i gets the i-th contiguous run of tokens; a global vector is shared by every slot). It has
    no parameters: a trainable adapter could collapse the target towards whatever is easy to predict.
    The module is held outside `state_dict`, so no checkpoint ever contains it.

    Args:
        path: the `torch.jit.save` file.
        n_slots: N.
        image_size: side S the encoder expects (None: the images as they come).
        probe_size: image side used to measure F at construction.
    """

    def __init__(self, path: str, *, n_slots: int, image_size: int | None, probe_size: int) -> None:
        super().__init__()
        if not Path(path).is_file():
            raise ValueError(
                f"alignment encoder file {path} does not exist (model.init_args.align_encoder.path: a "
                "torch.jit.save file of the frozen encoder)"
            )
        net = torch.jit.load(path, map_location="cpu").eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = [net]  # a list keeps it out of state_dict and checkpoints
        self.n_slots, self.image_size = n_slots, image_size
        side = image_size or probe_size
        self.width = int(self.forward(torch.zeros(1, 3, side, side)).shape[-1])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        net = self._net[0]
        first = next(iter(net.parameters()), None)
        if first is not None and first.device != images.device:
            net.to(images.device)
        if self.image_size and images.shape[-1] != self.image_size:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        f = net(images).float()
        if f.ndim == 4:
            f = f.flatten(2).transpose(1, 2)  # (B, F, h, w) -> (B, T, F)
        elif f.ndim == 2:
            f = f[:, None]  # (B, 1, F)
        if f.ndim != 3:
            raise ValueError(f"the alignment encoder returned shape {tuple(f.shape)}; expected 2-4 dims")
        return F.adaptive_avg_pool1d(f.transpose(1, 2), self.n_slots).transpose(1, 2)  # (B, N, F)
