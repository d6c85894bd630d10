"""A diffusion transformer over K merged tokens of an N-slot latent (one network for every K).

Letters: B batch, N latent slots, K merged tokens, C latent channels, D width, H hidden (SwiGLU).

The tokens are cluster means z~ = Gbar^T z of a fixed global merge pattern. Two things make one DiT
serve every K: each merged token gets the mean position of its member slots, p~ = Gbar^T p, and
attention adds log m_j to the logit of key j (proportional attention), so a merged token weighs as
much as the m_j unmerged slots it stands for. Blocks are adaLN-Zero (DiT) with RMSNorm, QK-norm and
SwiGLU (LightningDiT). With `k_conditioning` the adaLN vector also embeds K, for batches whose K
was chosen per image (content-adaptive mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlt.models.merge_ops import merge
from vlt.models.registry import register, register_model
from vlt.nn.attention import Attention, Kernel, size_bias
from vlt.nn.lora import add_lora
from vlt.nn.mlp import SwiGLU
from vlt.nn.modulation import AdaLN, LabelEmbedder, ScalarEmbedder, modulate

# The linears of each block that carry per-K adapters (the reference's LoRA targets).
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")


@dataclass
class DiTConfig:
    """DiT hyper-parameters.

    Args:
        n_slots: N, slots of the full latent (positions are learned per slot).
        channels: C, latent channels in and out.
        width, depth, heads: D, number of blocks, attention heads.
        mlp: SwiGLU gated hidden width as a multiple of D (8/3 matches a 4x GELU MLP in parameters).
        num_classes: real classes; label `num_classes` is the null label used by guidance.
        class_dropout: training-time label dropout rate (classifier-free guidance).
        qk_norm: RMS-normalise queries and keys per head.
        k_conditioning: add an embedding of K to the adaLN conditioning.
        freq_dim: sinusoidal feature width of the t (and K) embedders.
        pos_std: init std of the learned slot positions.
        norm_affine: learned weights on the block and final RMSNorms (the reference LightningDiT has
            them; vlt's own presets leave them out, as adaLN's scale already covers them).
        t_scale: the flow time is multiplied by this before the sinusoidal t embedding (1000 spreads
            t in [0, 1] over the frequencies like DiT's integer steps; the reference feeds t as is: 1).
        lora_ks: K values with a low-rank adapter on every block's attention and SwiGLU linears
            (`vlt.nn.lora`; the paper's "a DiT per K"); None: no adapters.
        lora_rank, lora_alpha: adapter rank R and scale numerator (update scale alpha / R).
        attention: the kernel of proportional attention (`vlt.nn.attention`): "sdpa" (a float mask,
            only where token sizes differ) or "flex" (FlexAttention's score_mod; fused on GPU).
    """

    n_slots: int = 32
    channels: int = 16
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp: float = 8 / 3
    num_classes: int = 10
    class_dropout: float = 0.1
    qk_norm: bool = True
    k_conditioning: bool = False
    freq_dim: int = 256
    pos_std: float = 0.02
    norm_affine: bool = False
    t_scale: float = 1000.0
    lora_ks: list[int] | None = None
    lora_rank: int = 32
    lora_alpha: float = 32.0
    attention: Kernel = "sdpa"

    @property
    def hidden(self) -> int:
        return int(self.mlp * self.width)


class DiTOutput(NamedTuple):
    velocity: Tensor  # (B, K, C)
    hidden: Tensor  # (B, K, D) tokens after the first `depth` blocks (representation alignment)


class DiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU, each branch modulated and gated by adaLN-Zero."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.width
        self.norm1 = nn.RMSNorm(d, elementwise_affine=cfg.norm_affine)
        self.attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm, kernel=cfg.attention)
        self.norm2 = nn.RMSNorm(d, elementwise_affine=cfg.norm_affine)
        self.mlp = SwiGLU(d, cfg.hidden)
        self.ada = AdaLN(d, 6)

    def forward(self, x: Tensor, c: Tensor, bias: Tensor | None) -> Tensor:
        """x: (B, K, D), c: (B, D), bias: proportional-attention key bias (see `size_bias`)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)  # 6 x (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), bias)  # (B, K, D)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, K, D)


class FinalLayer(nn.Module):
    """Modulated norm + linear to C channels; zero-initialised so the untrained model predicts 0."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.width, elementwise_affine=cfg.norm_affine)
        self.ada = AdaLN(cfg.width, 2)
        self.linear = nn.Linear(cfg.width, cfg.channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, K, C)


class DiT(nn.Module):
    """Velocity network v(x_t, t, y) on K merged tokens; see the module docstring for the design."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.x_embed = nn.Linear(cfg.channels, d)
        self.pos = nn.Parameter(torch.zeros(cfg.n_slots, d))  # (N, D) learned slot positions
        self.t_embed = ScalarEmbedder(d, freq_dim=cfg.freq_dim, scale=cfg.t_scale)
        self.y_embed = LabelEmbedder(cfg.num_classes, d, dropout=cfg.class_dropout)
        self.k_embed = ScalarEmbedder(d, freq_dim=cfg.freq_dim) if cfg.k_conditioning else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.initialize_weights()
        if cfg.lora_ks:  # after the init: adapters start at B = 0, so the base network is unchanged
            add_lora(self.blocks, LORA_TARGETS, cfg.lora_ks, rank=cfg.lora_rank, alpha=cfg.lora_alpha)

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def initialize_weights(self) -> None:
        """Xavier linears, small positions, N(0, 0.02) label/t-MLP weights; adaLN and output at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=self.cfg.pos_std)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for emb in (self.t_embed, self.k_embed):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start closed.
        for block in self.blocks:
            block.ada.zero_()
        self.final.ada.zero_()
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def positions(self, gbar: Tensor) -> Tensor:
        """Merged positions p~ = Gbar^T p: gbar (N, K) -> (1, K, D), or (B, N, K) -> (B, K, D)."""
        return merge(self.pos[None], gbar)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        gbar: Tensor,
        sizes: Tensor,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow velocity of merged latents.

        Args:
            x: (B, K, C) noisy merged latents.
            t: (B,) flow time in [0, 1] (0 noise, 1 data).
            y: (B,) long labels; `num_classes` means unconditional.
            gbar: (N, K) column-normalised assignment of this batch's K, or (B, N, K) per image.
            sizes: (K,) or (B, K) slots per token m_j (for the log m_j attention bias).
            force_drop_ids: (B,) with 1 where the label must be replaced by the null label; when None,
                labels are dropped at random at `class_dropout` in training mode only.

        Returns:
            (B, K, C) velocity.
        """
        h, c, bias = self._embed(x, t, y, gbar, sizes, force_drop_ids)
        return self.final(self._through(self.blocks, h, c, bias), c)  # (B, K, C)

    def forward_hidden(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        gbar: Tensor,
        sizes: Tensor,
        *,
        depth: int,
        force_drop_ids: Tensor | None = None,
    ) -> DiTOutput:
        """`forward` that also returns the hidden tokens after block `depth` (1..depth of the net):
        the DiT side of a representation-alignment loss. Arguments as in `forward`."""
        self._check_depth(depth)
        h, c, bias = self._embed(x, t, y, gbar, sizes, force_drop_ids)
        hidden = self._through(self.blocks[:depth], h, c, bias)  # (B, K, D)
        h = self._through(self.blocks[depth:], hidden, c, bias)  # (B, K, D)
        return DiTOutput(velocity=self.final(h, c), hidden=hidden)

    def hidden_states(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        gbar: Tensor,
        sizes: Tensor,
        *,
        depth: int,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        """(B, K, D) hidden tokens after block `depth`, running only the first `depth` blocks."""
        self._check_depth(depth)
        h, c, bias = self._embed(x, t, y, gbar, sizes, force_drop_ids)
        return self._through(self.blocks[:depth], h, c, bias)

    @staticmethod
    def _through(blocks: nn.ModuleList, h: Tensor, c: Tensor, bias: Tensor | None) -> Tensor:
        """Run tokens h (B, K, D) through `blocks` with conditioning c (B, D)."""
        for block in blocks:
            h = block(h, c, bias)  # (B, K, D)
        return h

    def _check_depth(self, depth: int) -> None:
        if not 1 <= depth <= self.cfg.depth:
            raise ValueError(f"hidden depth must be in [1, {self.cfg.depth}], got {depth}")

    def _embed(
        self, x: Tensor, t: Tensor, y: Tensor, gbar: Tensor, sizes: Tensor, force_drop_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Token embeddings (B, K, D), conditioning (B, D) and the attention key bias."""
        b, k, _ = x.shape
        h = self.x_embed(x) + self.positions(gbar)  # (B, K, D)
        c = self.t_embed(t) + self.y_embed(y, force_drop_ids)  # (B, D)
        if self.k_embed is not None:
            c = c + self.k_embed(torch.full((b,), float(k), device=x.device))  # (B, D)
        return h, c, size_bias(sizes)  # bias: (1 or B, 1, 1, K), None where all sizes are equal

    def flops(self, k: int) -> int:
        """Analytic forward FLOPs per image at K tokens (matmuls only, 2*m*n*k each).

        Counts the token linears, attention QK^T and AV, the per-image conditioning MLPs and adaLN
        linears, and the position merge; elementwise ops (norms, activations, modulation) are left
        out, as FLOP counters do. Attention makes it quadratic in K.
        """
        cfg, d, h = self.cfg, self.cfg.width, self.cfg.hidden
        block_tokens = 2 * k * d * (3 * d + d + 2 * h) + 2 * k * h * d  # qkv, proj, w12, w3
        block_attn = 2 * 2 * k * k * d  # QK^T and AV over all heads
        block_ada = 2 * d * 6 * d
        blocks = cfg.depth * (block_tokens + block_attn + block_ada)
        embed = 2 * k * cfg.channels * d + 2 * cfg.n_slots * k * d  # input linear, Gbar^T p
        scalar_mlp = 2 * (cfg.freq_dim * d + d * d)
        cond = scalar_mlp * (2 if cfg.k_conditioning else 1)
        final = 2 * d * 2 * d + 2 * k * d * cfg.channels
        lora = 2 * k * cfg.lora_rank * (8 * d + 3 * h) * cfg.depth if k in (cfg.lora_ks or ()) else 0
        return blocks + embed + cond + final + lora


# --- presets: (width, depth, heads) as in DiT/LightningDiT; N and C match the tokenizer presets ---
register_model("dit", DiT)


def _preset(width: int, depth: int, heads: int, n_slots: int, channels: int) -> DiTConfig:
    return DiTConfig(width=width, depth=depth, heads=heads, n_slots=n_slots, channels=channels)


@register("dit", "tiny")
def dit_tiny() -> DiTConfig:
    """Tiny DiT for CPU demos on the tiny tokenizer (N=32, C=16)."""
    return _preset(128, 4, 4, 32, 16)


@register("dit", "s")
def dit_s() -> DiTConfig:
    return _preset(384, 12, 6, 256, 32)


@register("dit", "b")
def dit_b() -> DiTConfig:
    return _preset(768, 12, 12, 256, 32)


@register("dit", "l")
def dit_l() -> DiTConfig:
    return _preset(1024, 24, 16, 256, 32)


@register("dit", "xl")
def dit_xl() -> DiTConfig:
    return _preset(1152, 28, 16, 256, 32)


def _reference(width: int, depth: int, heads: int) -> DiTConfig:
    """The reference LightningDiT on 1D latents (its `force_one_d_seq=256` path): learned RMSNorm
    weights, raw flow time into the t embedder, ImageNet's 1000 classes, N = 256 slots of C = 32."""
    return DiTConfig(
        width=width, depth=depth, heads=heads, n_slots=256, channels=32, num_classes=1000,
        norm_affine=True, t_scale=1.0,
    )  # fmt: skip


@register("dit", "lgm-b")
def dit_lgm_b() -> DiTConfig:
    """The reference's LightningDiT-B block layout (the paper's DiT-B rows)."""
    return _reference(768, 12, 12)


@register("dit", "lgm-xl")
def dit_lgm_xl() -> DiTConfig:
    """The reference's LightningDiT-XL block layout: the released `xl.pth` converts into it."""
    return _reference(1152, 28, 16)
