"""DINOv2 initialisation of the stage-1 encoder from a local checkpoint in the public DINOv2 / timm layout.

Letters: P patches, G grid side (P = G^2), D width, s patch side.

The paper's tokenizer starts its encoder from DINOv2 (the reference builds timm's
`vit_base_patch14_dinov2.lvd142m` at patch 16 with pretrained weights). `init_encoder` does the same for
vlt's `Tokenizer`: it reads a DINOv2 state dict (`patch_embed.proj.*`, `cls_token`, `pos_embed`,
`blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `norm.*`), adapts it
to the encoder's grid and patch size as timm does when it builds that ViT at another size (position
embeddings resized bicubically over the grid, `vlt.models.dino.resample_pos_embed`; the patch kernel by
FlexiViT's pseudo-inverse resize, `resample_patch_kernel`), and maps the keys with the reference
converter's ViT mapping (`vlt.stages.reference.vit_encoder_state`). The slots, the bottleneck and the
decoder keep their own initialisation.

Width, depth, heads (DINOv2's heads are 64 wide) and MLP width must equal the encoder's, and so must the
block details: a cls token, LayerScale and LayerNorm eps 1e-6 (`tokenizer.cls_token`, `layer_scale`,
`norm_eps`). `register_tokens` (DINOv2 with registers), `mask_token` and heads are dropped and reported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from torch import Tensor

from vlt.models.dino import read_weights, resample_patch_kernel, resample_pos_embed, vit_depth
from vlt.models.tokenizer import Tokenizer, TokenizerConfig
from vlt.stages.reference import vit_encoder_state

log = logging.getLogger(__name__)
CONFIG_KEY = "model.init_args.encoder_init"
DINOV2_HEAD_WIDTH = 64
DINOV2_NORM_EPS = 1e-6
# Parts of a DINOv2 checkpoint the tokenizer's encoder has no place for: prefix -> what it is.
DINOV2_DROPPED: dict[str, str] = {
    "register_tokens": "DINOv2's register tokens (the encoder's sequence has none)",
    "reg_token": "timm's name for the register tokens",
    "mask_token": "DINOv2's iBOT mask token (training only)",
    "head.": "a classifier or projection head",
}
_ENCODER_PREFIXES = ("patch_embed.", "enc_pos", "enc_cls", "encoder.")


class EncoderInit(NamedTuple):
    loaded: int  # tensors written into the encoder
    dropped: list[str]  # checkpoint keys left out (DINOV2_DROPPED)
    grid: tuple[int, int]  # position grid side: (in the file, in the encoder)
    patch: tuple[int, int]  # patch side: (in the file, in the encoder)


def missing_encoder_init(path: str, reason: str | None = None) -> str:
    return (
        f"{CONFIG_KEY}={path}: {reason or 'no such file'}. Expected a DINOv2 ViT state dict in the public "
        "DINOv2/timm key layout (patch_embed.proj.*, cls_token, pos_embed, blocks.i.*, norm.*), e.g. the "
        "released dinov2_vitb14_pretrain.pth, or torch.save(model.state_dict(), path) of a timm DINOv2 ViT; "
        f"place it e.g. at weights/dinov2_vitb14_pretrain.pth and pass it as {CONFIG_KEY}=<path>; or set "
        f"{CONFIG_KEY}=null to start the encoder from scratch."
    )


def read_dinov2(path: str) -> dict[str, Tensor]:
    """The checkpoint's tensors; a missing or unreadable file is a ValueError with the guidance."""
    if not Path(path).is_file():
        raise ValueError(missing_encoder_init(path))
    try:
        return read_weights(path)
    except Exception as exc:  # a damaged file, a pickle of code, not a state dict
        raise ValueError(missing_encoder_init(path, f"the file cannot be read ({exc})")) from exc


def check_shapes(state: dict[str, Tensor], cfg: TokenizerConfig, path: str) -> None:
    """Refuse a checkpoint whose ViT is not the encoder's, naming both shapes and the config fix."""
    if "cls_token" not in state or "blocks.0.mlp.fc1.weight" not in state:
        raise ValueError(missing_encoder_init(path, "not a DINOv2 ViT state dict (no cls_token / blocks)"))
    d = state["cls_token"].shape[-1]
    theirs = (d, vit_depth(state), d // DINOV2_HEAD_WIDTH, state["blocks.0.mlp.fc1.weight"].shape[0])
    ours = (cfg.width, cfg.enc_depth, cfg.heads, int(cfg.width * cfg.mlp_ratio))
    if theirs != ours:
        raise ValueError(
            f"{CONFIG_KEY}={path} is a ViT of width {theirs[0]}, depth {theirs[1]}, {theirs[2]} heads, MLP "
            f"{theirs[3]}; the tokenizer's encoder is width {ours[0]}, depth {ours[1]}, {ours[2]} heads, MLP "
            f"{ours[3]}: set model.init_args.tokenizer (width, enc_depth, heads, mlp_ratio) to the file's ViT"
        )
    scaled = "blocks.0.ls1.gamma" in state
    fixes = {  # detail -> (the encoder's, the file's, the setting that matches the file)
        "cls_token": (cfg.cls_token, True, "tokenizer.cls_token=true"),
        "layer_scale": (
            cfg.layer_scale is not None,
            scaled,
            f"tokenizer.layer_scale={'1.0e-5' if scaled else 'null'}",
        ),
        "norm_eps": (cfg.norm_eps, DINOV2_NORM_EPS, "tokenizer.norm_eps=1.0e-6"),
    }
    wrong = [fix for have, want, fix in fixes.values() if have != want]
    if wrong:
        raise ValueError(
            f"{CONFIG_KEY}={path}: the encoder's blocks differ from the file's; set {', '.join(wrong)} "
            "(model.init_args.tokenizer)"
        )


def encoder_state_from_dinov2(state: dict[str, Tensor], cfg: TokenizerConfig) -> dict[str, Tensor]:
    """The DINOv2 tensors (dropped parts removed) at the encoder's grid and patch size, in vlt's keys."""
    state = dict(state)
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], cfg.grid)
    state["patch_embed.proj.weight"] = resample_patch_kernel(state["patch_embed.proj.weight"], cfg.patch_size)
    return vit_encoder_state(state, what=f"{CONFIG_KEY} (DINOv2)")


def init_encoder(tokenizer: Tokenizer, path: str) -> EncoderInit:
    """Overwrite the tokenizer's encoder (patch embedding, position embeddings, cls token, blocks, final
    norm) with a DINOv2 checkpoint's weights; see the module docstring. Raises ValueError, naming the
    config key and the file, on a missing or unreadable file, another ViT size, or keys that do not map."""
    cfg = tokenizer.cfg
    raw = read_dinov2(path)
    dropped = sorted(k for k in raw if k.startswith(tuple(DINOV2_DROPPED)))
    state = {k: v for k, v in raw.items() if k not in dropped}
    check_shapes(state, cfg, path)
    try:
        encoder = encoder_state_from_dinov2(state, cfg)
    except ValueError as exc:
        raise ValueError(f"{CONFIG_KEY}={path}: {exc}") from exc
    expected = {k for k in tokenizer.state_dict() if k.startswith(_ENCODER_PREFIXES)}
    missing, unexpected = sorted(expected - set(encoder)), sorted(set(encoder) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{CONFIG_KEY}={path}: keys do not map onto the encoder: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    tokenizer.load_state_dict(encoder, strict=False)
    report = EncoderInit(
        len(encoder), dropped, (_grid_side(raw["pos_embed"]), cfg.grid),
        (raw["patch_embed.proj.weight"].shape[-1], cfg.patch_size),
    )  # fmt: skip
    log.info("encoder initialised from %s: %s", path, report)
    return report


def _grid_side(pos: Tensor) -> int:
    return round((pos.shape[1] - 1) ** 0.5)
