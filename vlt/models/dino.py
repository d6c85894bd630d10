"""A frozen DINO / DINOv2 ViT read from a local weights file, and the resampling pretrained ViT weights need.

Letters: B batch, P patches, G grid side (P = G^2), R register tokens, D width, s patch side, H/W image size.

`DinoViT` is vlt's own pre-norm ViT (`vlt.nn.vit.Block`) under the public DINO / DINOv2 key names (timm's
layout): `patch_embed.proj.*` (a conv), `cls_token` (1, 1, D), `pos_embed` (1, 1 + P, D), optional
`register_tokens` (1, R, D), `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` and, in
DINOv2, LayerScale `blocks.i.ls1.gamma`/`ls2.gamma`. A released backbone such as DINO's
`dino_deitsmall16_pretrain.pth` or DINOv2's `dinov2_vits14_pretrain.pth` loads as it is (its final norm,
mask token and head are not used and dropped); `DinoViT.save` writes the same layout.

Nothing is downloaded. Width, depth and heads come from a size preset (`DINO_SIZES`) and must match the
file; patch size, LayerScale and register tokens are read from the file (they tell DINO from DINOv2 at
one size). Position embeddings of another grid are resized bicubically, as DINOv2 does for other inputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlt.nn.vit import Block

State = dict[str, Tensor]

DinoSize = Literal["tiny", "s", "b"]
# name -> (width D, depth, heads). DINO and DINOv2 heads are 64 wide; "tiny" is for tests and CPU trials.
DINO_SIZES: dict[str, tuple[int, int, int]] = {"tiny": (32, 2, 2), "s": (384, 12, 6), "b": (768, 12, 12)}
# Parts of released backbones that a feature extractor does not use: prefix -> what it is.
DINO_UNUSED: dict[str, str] = {
    "norm.": "the final LayerNorm (features are read after blocks, before it)",
    "fc_norm.": "timm's pooled-feature norm",
    "head.": "a classifier or projection head",
    "mask_token": "DINOv2's iBOT mask token (training only)",
}
# ImageNet statistics: DINO and DINOv2 take images normalised by them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resample_pos_embed(pos: Tensor, grid: int, *, prefix: int = 1) -> Tensor:
    """Position embeddings for a grid x grid patch raster: the patch rows resized bicubically as a
    (D, G, G) image (DINOv2's `interpolate_pos_encoding`: no antialiasing), the prefix rows kept.

    Args:
        pos: (1, prefix + G*G, D), patch rows in raster (row-major) order.
        grid: the new side G'.

    Returns:
        (1, prefix + G'*G', D); `pos` itself when G' = G.
    """
    rows = pos.shape[1] - prefix
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"position embedding of {rows} patch rows is not a square grid")
    if side == grid:
        return pos
    image = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, D, G, G)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_rows = image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)  # (1, G'^2, D)
    return torch.cat([pos[:, :prefix], patch_rows], dim=1)


def resample_patch_kernel(weight: Tensor, size: int) -> Tensor:
    """A patch-embedding kernel for another patch side: FlexiViT's pseudo-inverse resize (what timm
    does when it builds a pretrained ViT at another patch size).

    The new kernel w' solves <resize(x), w'> = <x, w> for every s x s patch x, with resize = bicubic
    (antialiased) from s to `size`: exact when size >= s, least squares when smaller.

    Args:
        weight: (D, 3, s, s).
        size: the new side s'.

    Returns:
        (D, 3, s', s'); `weight` itself when s' = s.
    """
    side = weight.shape[-1]
    if side == size:
        return weight
    basis = torch.eye(side * side, dtype=torch.float64).reshape(-1, 1, side, side)  # (s^2, 1, s, s)
    resized = F.interpolate(basis, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    resize_t = resized.reshape(side * side, size * size)  # (s^2, s'^2): the transpose of the resize map
    flat = weight.reshape(-1, side * side).double().T  # (s^2, D*3)
    new = torch.linalg.pinv(resize_t) @ flat  # (s'^2, D*3)
    return new.T.reshape(*weight.shape[:2], size, size).to(weight.dtype)


def read_weights(path: str | Path) -> State:
    """A bare state dict from a local file, loaded with `weights_only=True` (tensors only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a bare state dict of tensors")
    return dict(state)


def vit_depth(state: Mapping[str, Tensor]) -> int:
    """Number of blocks in a timm-layout ViT state dict (`blocks.i.*`)."""
    found = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    return 1 + max(found) if found else 0


class DinoViT(nn.Module):
    """A frozen DINO-layout ViT that returns patch features after chosen blocks.

    Args:
        width, depth, heads: D, the number of blocks, attention heads.
        patch_size: s.
        image_size: side the images are resized to before the patch embedding (G = image_size / s).
        registers: R register tokens (DINOv2 "with registers"), 0 for none.
        layer_scale: blocks with LayerScale (DINOv2); their gains come from the file.
        mlp_ratio: MLP hidden width over D.
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        patch_size: int = 16,
        image_size: int = 224,
        registers: int = 0,
        layer_scale: bool = False,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"backbone image size {image_size} is not a multiple of its patch {patch_size}")
        self.image_size, self.grid, self.width = image_size, image_size // patch_size, width
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, width, patch_size, stride=patch_size)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, width))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, width)) if registers else None
        gain = 1.0 if layer_scale else None
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, layer_scale=gain, norm_eps=1e-6) for _ in range(depth)
        )
        # Not persistent: the file holds exactly the released layout.
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("x_scale", (0.5 / std).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).reshape(1, 3, 1, 1), persistent=False)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> DinoViT:
        return super().train(False)  # frozen: always in eval mode

    def forward(self, images: Tensor, layers: tuple[int, ...]) -> list[Tensor]:
        """Features after each block in `layers` (-1: the embedding, before any block).

        Args:
            images: (B, 3, H, W) in [-1, 1]; resized to the backbone's side (bicubic up, area down).
            layers: sorted block indices in [-1, depth).

        Returns:
            one (B, D, P) tensor per layer: each patch token plus the cls token (DINO's readout).
        """
        x = images.float() * self.x_scale + self.x_shift  # (B, 3, H, W), ImageNet-normalised
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            mode = "area" if x.shape[-1] > self.image_size else "bicubic"
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode=mode)
        x = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + P, D)
        if self.register_tokens is not None:  # DINOv2: registers after the cls token, no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        skip = 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1])
        out = [_readout(x, skip)] if -1 in layers else []
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            x = block(x)  # (B, T, D)
            if i in layers:
                out.append(_readout(x, skip))
        return out

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def from_file(cls, path: str | Path, *, size: DinoSize, image_size: int = 224) -> DinoViT:
        """The frozen backbone of a DINO-layout state dict (see the module docstring); `size` names its
        `DINO_SIZES` entry. Raises ValueError on another layout or size, naming what differs."""
        if size not in DINO_SIZES:
            raise ValueError(f"unknown backbone size {size!r}; choose one of {tuple(DINO_SIZES)}")
        state = {k: v for k, v in read_weights(path).items() if not k.startswith(tuple(DINO_UNUSED))}
        needed = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.mlp.fc1.weight")
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"{path} is not a DINO-layout ViT state dict: no {missing}")
        width, depth, heads = DINO_SIZES[size]
        found = (state["cls_token"].shape[-1], vit_depth(state))
        if found != (width, depth):
            raise ValueError(
                f"{path} holds a ViT of width {found[0]} and depth {found[1]}, but backbone size {size!r} is "
                f"width {width}, depth {depth}; pick the size of the file ({_sizes()})"
            )
        patch = state["patch_embed.proj.weight"].shape[-1]
        registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        net = cls(
            width=width, depth=depth, heads=heads, patch_size=patch, image_size=image_size,
            registers=registers, layer_scale="blocks.0.ls1.gamma" in state,
            mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
        )  # fmt: skip
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], net.grid)
        result = net.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path}: keys do not match a DINO-layout ViT: missing {result.missing_keys[:6]}, "
                f"unexpected {result.unexpected_keys[:6]}"
            )
        return net.requires_grad_(False).eval()


def _readout(x: Tensor, skip: int) -> Tensor:
    """Tokens (B, T, D) -> patch features (B, D, P): each patch token plus the cls token."""
    return (x[:, skip:] + x[:, :1]).transpose(1, 2)


def _sizes() -> str:
    return ", ".join(f"{name}: width {w}, depth {d}" for name, (w, d, _) in DINO_SIZES.items())
