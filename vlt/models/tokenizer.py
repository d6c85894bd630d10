"""Stage 1: a 1D ViT tokenizer that turns an image into N latent slots and back.

Letters: B batch, P image patches, N latent slots, C latent channels, D width, Q = patch*patch*3.

Encoder: a ViT over [P patch embeddings + pos-emb, N learned slot tokens]; the N slot outputs are
projected to C channels by the bottleneck. Decoder: a ViT over [P mask tokens + 2D pos-emb,
N slots = Linear(z) + learned slot position embeddings]; the P outputs predict pixels. The decoder
always sees N slots: merged tokens are unmerged (broadcast back) before decoding.

With `cls_token` both sequences start with one learned prefix token (timm ViTs have one, and the
released reference tokenizer keeps it in its encoder and decoder): [cls, P patches, N slots].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlt.models.bottleneck import BOTTLENECKS, make_bottleneck
from vlt.models.registry import register, register_model
from vlt.nn.flops import transformer_flops
from vlt.nn.posemb import sincos_2d
from vlt.nn.vit import Transformer


@dataclass
class TokenizerConfig:
    """Every knob of the tokenizer.

    head: "linear" maps each decoder token to its patch's pixels (ViT/MAE); "conv" adds a residual
        3x3 conv block on the unpatchified image (`head_channels` wide, last conv zero-initialised so it
        starts as the linear head), which removes patch-seam blockiness at a few % of the decoder's FLOPs.
    init: "paper" puts slot, slot-position and mask embeddings at std 0.02 and starts both patch
        position embeddings from 2D sin-cos (learnable). "tiny" puts slots, decoder position queries
        and decoder slot positions at std 1, the mask token at 0 and the encoder pos-emb at std 0.3:
        at width 64 the small init made every slot identical (collapse), O(1) init keeps them apart.
    bottleneck: "kl", "layernorm" or "softvq" (`vlt.models.bottleneck`); SoftVQ reads `codebooks`
        codebooks of `codebook_size` entries at temperature `codebook_tau` (N divisible by codebooks).
    cls_token: one learned prefix token at the head of the encoder and decoder sequences (its
        position embedding folded in); it carries no output.
    layer_scale, norm_eps: timm/DINOv2 block details (`vlt.nn.vit`): LayerScale's initial gain
        (None: none) and the LayerNorm epsilon.
    """

    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    enc_depth: int = 2
    dec_depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    n_slots: int = 32
    channels: int = 16
    bottleneck: Literal["kl", "layernorm", "softvq"] = "layernorm"
    kl_sample: bool = True
    codebooks: int = 4
    codebook_size: int = 8192
    codebook_tau: float = 0.07
    init: Literal["paper", "tiny"] = "tiny"
    qk_norm: bool = False
    head: Literal["linear", "conv"] = "linear"
    head_channels: int = 32
    cls_token: bool = False
    layer_scale: float | None = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch_size}")
        if self.init not in ("paper", "tiny"):
            raise ValueError(f"unknown init {self.init!r}; choose one of 'paper', 'tiny'")
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"unknown bottleneck {self.bottleneck!r}; choose one of {BOTTLENECKS}")
        if self.bottleneck == "softvq" and self.n_slots % self.codebooks:
            raise ValueError(f"{self.n_slots} slots do not split into {self.codebooks} codebook groups")
        if self.head not in ("linear", "conv"):
            raise ValueError(f"unknown head {self.head!r}; choose one of 'linear', 'conv'")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def n_prefix(self) -> int:
        """Prefix tokens ahead of the patches (1 with `cls_token`)."""
        return int(self.cls_token)


class Encoded(NamedTuple):
    z: Tensor  # (B, N, C) latent used downstream: sampled in KL training, else the mean
    kl: Tensor  # () the bottleneck's regulariser (KL, SoftVQ's codebook entropy; 0 for layernorm)


class Tokenizer(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] <-> N slot latents (B, N, C). See `TokenizerConfig`."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p, n = cfg.width, cfg.n_patches, cfg.n_slots
        q = cfg.patch_size**2 * 3
        kw: dict[str, Any] = {
            "mlp_ratio": cfg.mlp_ratio, "qk_norm": cfg.qk_norm,
            "layer_scale": cfg.layer_scale, "norm_eps": cfg.norm_eps,
        }  # fmt: skip
        # Encoder.
        self.patch_embed = nn.Linear(q, d)
        self.enc_pos = nn.Parameter(torch.zeros(p, d))
        self.slots = nn.Parameter(torch.zeros(n, d))
        self.enc_cls = nn.Parameter(torch.zeros(1, d)) if cfg.cls_token else None
        self.encoder = Transformer(d, cfg.enc_depth, cfg.heads, **kw)
        self.bottleneck = make_bottleneck(
            cfg.bottleneck, width=d, channels=cfg.channels, sample=cfg.kl_sample,
            codebooks=cfg.codebooks, codebook_size=cfg.codebook_size, tau=cfg.codebook_tau,
        )  # fmt: skip
        # Decoder.
        self.latent_in = nn.Linear(cfg.channels, d)
        self.slot_pos = nn.Parameter(torch.zeros(n, d))
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.dec_pos = nn.Parameter(torch.zeros(p, d))
        self.dec_cls = nn.Parameter(torch.zeros(1, d)) if cfg.cls_token else None
        self.decoder = Transformer(d, cfg.dec_depth, cfg.heads, **kw)
        self.to_pixels = nn.Linear(d, q)
        self.refine = ConvRefine(cfg.head_channels) if cfg.head == "conv" else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias (as in DiT), then the embeddings per `cfg.init`."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        cfg = self.cfg
        with torch.no_grad():
            if cfg.init == "paper":
                pos = sincos_2d(cfg.grid, cfg.width)
                self.enc_pos.copy_(pos)
                self.dec_pos.copy_(pos)
                for emb in (self.slots, self.slot_pos, self.mask_token):
                    nn.init.normal_(emb, std=0.02)
            else:
                nn.init.normal_(self.enc_pos, std=0.3)
                nn.init.normal_(self.dec_pos, std=1.0)
                nn.init.normal_(self.slots, std=1.0)
                nn.init.normal_(self.slot_pos, std=1.0)
                nn.init.zeros_(self.mask_token)
            if cfg.cls_token:
                nn.init.normal_(self.enc_cls, std=0.02)
                nn.init.normal_(self.dec_cls, std=0.02)
            if self.refine is not None:
                self.refine.reset_parameters()

    def encode(self, images: Tensor) -> Encoded:
        """images (B, 3, H, W) -> Encoded(z (B, N, C), kl ())."""
        s = self.cfg.patch_size
        patches = rearrange(images, "b c (h s1) (w s2) -> b (h w) (s1 s2 c)", s1=s, s2=s)  # (B, P, Q)
        x = self.patch_embed(patches) + self.enc_pos  # (B, P, D)
        seq = self._prefixed(self.enc_cls, x, self.slots.expand(x.shape[0], -1, -1))  # (B, L, D)
        h = self.encoder(seq)[:, -self.cfg.n_slots :]  # (B, N, D)
        out = self.bottleneck(h)
        return Encoded(z=out.z, kl=out.kl)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, N, C) -> images (B, 3, H, W), roughly in [-1, 1] (no final squashing)."""
        b, p, c = z.shape[0], self.cfg.n_patches, self.cfg.n_prefix
        slots = self.latent_in(z) + self.slot_pos  # (B, N, D)
        queries = (self.mask_token + self.dec_pos).expand(b, -1, -1)  # (B, P, D)
        h = self.decoder(self._prefixed(self.dec_cls, queries, slots))[:, c : c + p]  # (B, P, D)
        patches = self.to_pixels(h)  # (B, P, Q)
        s, g = self.cfg.patch_size, self.cfg.grid
        images = rearrange(patches, "b (h w) (s1 s2 c) -> b c (h s1) (w s2)", h=g, w=g, s1=s, s2=s)
        return images if self.refine is None else self.refine(images)

    @staticmethod
    def _prefixed(cls: Tensor | None, x: Tensor, slots: Tensor) -> Tensor:
        """[cls (if any), x (B, P, D), slots (B, N, D)] -> (B, L, D), L = 0|1 + P + N."""
        parts = [x, slots] if cls is None else [cls.expand(x.shape[0], -1, -1), x, slots]
        return torch.cat(parts, dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """Plain autoencoding without merging: images -> z -> images."""
        return self.decode(self.encode(images).z)

    def flops(self, part: Literal["encode", "decode"]) -> int:
        """Analytic forward FLOPs per image of the encoder or decoder transformer (P + N tokens)."""
        cfg = self.cfg
        depth = {"encode": cfg.enc_depth, "decode": cfg.dec_depth}[part]
        hidden = int(cfg.width * cfg.mlp_ratio)
        length = cfg.n_prefix + cfg.n_patches + cfg.n_slots
        flops = transformer_flops(length, cfg.width, depth, hidden, gated=False)
        if part == "decode" and self.refine is not None:
            flops += self.refine.flops(cfg.image_size)
        return flops


class ConvRefine(nn.Module):
    """x + conv(gelu(conv(x))): a residual 3x3 refinement of the decoded image (B, 3, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, 3, 3, padding=1)

    def reset_parameters(self) -> None:
        self.inp.reset_parameters()
        nn.init.zeros_(self.out.weight)  # starts as the identity: the linear head's image
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out(F.gelu(self.inp(x)))

    def flops(self, size: int) -> int:
        """Multiply-adds x 2 of both convs on a size x size image."""
        return 2 * size * size * 9 * 2 * 3 * self.inp.out_channels


# --- presets: one-line configs; `vlt.models.create("tokenizer", name)` builds them ---
register_model("tokenizer", Tokenizer)


@register("tokenizer", "tiny")
def tiny() -> TokenizerConfig:
    """32x32, patch 4 (P=64), width 64, depth 2+2, N=32, C=16, LayerNorm bottleneck, O(1) init."""
    return TokenizerConfig()


@register("tokenizer", "s")
def s() -> TokenizerConfig:
    """256x256, patch 16 (P=256), a ViT-S encoder and a ViT-S decoder (384 wide, 12+12, 6 heads),
    N=256, C=16, KL bottleneck, paper init."""
    return TokenizerConfig(
        image_size=256, patch_size=16, width=384, enc_depth=12, dec_depth=12, heads=6,
        n_slots=256, channels=16, bottleneck="kl", init="paper",
    )  # fmt: skip


@register("tokenizer", "b")
def b() -> TokenizerConfig:
    """256x256, patch 16 (P=256), a ViT-B encoder and a ViT-B decoder (768 wide, 12+12, 12 heads),
    N=256, C=32, KL bottleneck, paper init."""
    return TokenizerConfig(
        image_size=256, patch_size=16, width=768, enc_depth=12, dec_depth=12, heads=12,
        n_slots=256, channels=32, bottleneck="kl", init="paper",
    )  # fmt: skip


@register("tokenizer", "lgm-b")
def lgm_b() -> TokenizerConfig:
    """The released reference tokenizer's shape ("ours2_32", `vlt convert --tokenizer`): 256x256, patch
    16, DINOv2-style ViT-B encoder and decoder (768 wide, 12+12, 12 heads, a cls token, LayerScale,
    LayerNorm eps 1e-6), N=256, C=32, SoftVQ with 4 codebooks x 8192 entries at tau 0.07."""
    return TokenizerConfig(
        image_size=256, patch_size=16, width=768, enc_depth=12, dec_depth=12, heads=12,
        n_slots=256, channels=32, bottleneck="softvq", codebooks=4, codebook_size=8192,
        codebook_tau=0.07, init="paper", cls_token=True, layer_scale=1e-5, norm_eps=1e-6,
    )  # fmt: skip
