"""Converters from the reference implementation's released files (`movinghoon/lgm`) to vlt's stage objects.

Letters: N slots, K merged tokens, C channels, D width, R LoRA rank.

The paper's authors publish a LightningDiT-XL generator (`xl.pth`), length-specific LoRA fine-tunes
(`lora_32.pth`, `lora_128.pth`), a merge table (`ours2-d32.pt`: K -> (Gbar (N, K), sizes (K,))) and
the latent statistics of their latent data set (`latents_stats.pt`: mean, std (1, 1, C)). This module
reads those layouts (with `torch.load(weights_only=True)`: tensors and plain containers only) and
maps their keys onto vlt's modules; every reference key must map and every vlt key must be filled,
so a layout change fails loudly instead of loading half a network.

Generator keys (reference LightningDiT with `force_one_d_seq`, see `DIT_KEYS`):
    x_embedder -> x_embed, pos_embed (1, N, D) -> pos (N, D), t_embedder.mlp -> t_embed.mlp,
    y_embedder.embedding_table -> y_embed.table, transformer.blocks.i -> blocks.i
    (adaLN_modulation.1 -> ada.linear; norm1/norm2, attn.qkv/proj/q_norm/k_norm, mlp.w12/w3 keep their
    names), final_layer.{norm, linear, adaLN_modulation.1} -> final.{norm, linear, ada.linear}.
LoRA checkpoints are PEFT state dicts of that model: `base_model.model.<key>` for the base,
`<layer>.base_layer.*` for an adapted layer's base weights and `<layer>.lora_A|lora_B.<name>.weight`
for its adapter, which becomes vlt's `<layer>.adapters.<K>.a|b` (`vlt.nn.lora`).

Tokenizer keys (`tokenizer.pt`: the reference's SoftVQModel2, timm DINOv2 ViTs, `ema` weights), to
vlt's `Tokenizer` (preset `lgm-b`; the reference sequences are [cls, P patches, N slots] in both ViTs):
    encoder.model.patch_embed.proj (conv (D, 3, s, s)) -> patch_embed (linear on (s1 s2 c) patches),
    encoder.model.pos_embed (1, 1 + P, D) -> enc_pos = its P patch rows; encoder.model.cls_token + its
    position row -> enc_cls; encoder.latent_tokens + encoder.latent_pos_embed -> slots (they are only
    ever used summed); {encoder, decoder}.model.blocks.i.* -> {encoder, decoder}.blocks.i.* (norm1,
    attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma keep their names);
    {encoder, decoder}.model.norm -> {encoder, decoder}.norm; quant_conv -> bottleneck.proj;
    quantize.embedding (G, V, C) -> bottleneck.codebook; post_quant_conv -> latent_in;
    decoder.latent_pos_embed -> slot_pos; decoder.mask_token -> mask_token; decoder.model.pos_embed ->
    dec_pos (patch rows) and, with decoder.model.cls_token, dec_cls; decoder.to_pixel.model -> to_pixels;
    merge_module.embeddings (N, E) -> the MergePattern (cut as the reference cuts it, `REFERENCE_KS`).
The encoder part of this mapping (`vit_encoder_state`) also initialises vlt's encoder from DINOv2
(`vlt.stages.dinov2`). Training-only parts (`TOKENIZER_DROPPED`: the DINOv2 teacher, the auxiliary
decoder, the codebook-usage log, ...) are dropped by name and reported; any other unknown key is an error.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vlt.models.dit import DiT, DiTConfig
from vlt.models.merging import hierarchy
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec
from vlt.stages.generator import LatentGenerator
from vlt.stages.tokenizer import VariableLengthTokenizer

State = dict[str, Tensor]

# (reference pattern, vlt replacement), applied to every key in order; the first match wins.
DIT_KEYS: list[tuple[str, str]] = [
    (r"^x_embedder\.", "x_embed."),
    (r"^pos_embed$", "pos"),
    (r"^t_embedder\.mlp\.", "t_embed.mlp."),
    (r"^y_embedder\.embedding_table\.", "y_embed.table."),
    (r"^transformer\.blocks\.(\d+)\.adaLN_modulation\.1\.", r"blocks.\1.ada.linear."),
    (r"^transformer\.blocks\.(\d+)\.((norm1|norm2|attn|mlp)\..*)$", r"blocks.\1.\2"),
    (r"^final_layer\.adaLN_modulation\.1\.", "final.ada.linear."),
    (r"^final_layer\.((norm|linear)\..*)$", r"final.\1"),
]
PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(.*)\.lora_(A|B)\.[^.]+\.weight$")

# The reference's sampling protocol for its XL generator (README of movinghoon/lgm): its
# `--num_sampling_steps 25` is a 25-point grid linspace(0, 1, 25) integrated by Euler (24 steps), shifted
# by 0.3, guidance only for t in [0.1, 1], weights per K.
PAPER_FLOW = FlowSpec(
    sample_steps=24, sampler="euler", timestep_shift=0.3, cfg_scale=8.0,
    cfg_scales={32: 10.5, 64: 8.0, 128: 6.5}, cfg_interval=(0.1, 1.0),
)  # fmt: skip


# How the reference evaluates its LoRA files (evaluate_lora.py, README): they were fine-tuned on a base
# trained with plain noise, so it samples them with N(0, I_K) noise and plain CFG at w = 2.0.
LORA_FLOW = FlowSpec(
    sample_steps=24, sampler="euler", timestep_shift=0.3, cfg_scale=2.0, cfg_interval=(0.1, 1.0),
    noise="plain", guidance="uniform",
)  # fmt: skip


class ConversionError(ValueError):
    """A reference file whose keys or shapes do not match the layout this converter knows."""


def read_reference(path: str | Path) -> Any:
    """A reference file loaded with `weights_only=True`; its `args` (an argparse.Namespace) allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference file at {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def model_state(ckpt: Mapping[str, Any], *, weights: str = "ema") -> State:
    """The state dict in a reference training checkpoint: `model_ema` (weights="ema", the one the
    reference evaluates) or `model` (weights="model"); a bare state dict is returned as is."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if "model" not in ckpt and "model_ema" not in ckpt:
        return dict(ckpt)
    key = "model_ema" if weights == "ema" and ckpt.get("model_ema") is not None else "model"
    if ckpt.get(key) is None:
        raise ConversionError(f"the checkpoint has no {key!r} weights")
    return dict(ckpt[key])


def rename(state: Mapping[str, Tensor], rules: list[tuple[str, str]], *, what: str) -> State:
    """Keys renamed by the first matching rule; a key no rule matches is an error (never dropped)."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            if re.search(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{what}: keys with no vlt counterpart: {unknown[:8]} ({len(unknown)} in all)")
    return out


def dit_config_from_reference(state: Mapping[str, Tensor], **overrides: Any) -> DiTConfig:
    """The DiTConfig of a reference LightningDiT state dict, read from its shapes (heads from the
    QK-norm width, classes from the label table less its null row)."""
    if "pos_embed" not in state or state["pos_embed"].ndim != 3:
        raise ConversionError("not a 1D reference LightningDiT: no pos_embed of shape (1, N, D)")
    _, n, d = state["pos_embed"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k)))
    q_norm = state.get("transformer.blocks.0.attn.q_norm.weight")
    hidden = state["transformer.blocks.0.mlp.w3.weight"].shape[1]
    cfg = DiTConfig(
        n_slots=n, channels=state["x_embedder.weight"].shape[1], width=d, depth=depth,
        heads=d // q_norm.shape[0] if q_norm is not None else overrides.pop("heads", 16),
        mlp=hidden / d, num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        qk_norm=q_norm is not None, norm_affine="transformer.blocks.0.norm1.weight" in state, t_scale=1.0,
    )  # fmt: skip
    cfg = replace(cfg, **overrides)
    if cfg.hidden != hidden:
        raise ConversionError(f"SwiGLU width {hidden} is not int(mlp * width) = {cfg.hidden}")
    return cfg


def dit_state_from_reference(state: Mapping[str, Tensor]) -> State:
    """A reference LightningDiT state dict in vlt's DiT layout (see the module docstring)."""
    out = rename(state, DIT_KEYS, what="reference DiT")
    out["pos"] = out["pos"][0]  # (1, N, D) -> (N, D)
    return out


def split_peft(state: Mapping[str, Tensor], k: int) -> tuple[State, State]:
    """A PEFT LoRA state dict -> (the base model's reference state, vlt adapter tensors for K)."""
    base, adapters = {}, {}
    for key, value in state.items():
        key = key.removeprefix(PEFT_PREFIX)
        if m := _LORA.match(key):
            layer = dit_state_key(m.group(1))
            adapters[f"{layer}.adapters.{k}.{m.group(2).lower()}"] = value
        else:
            base[key.replace(".base_layer.", ".")] = value
    if not adapters:
        raise ConversionError("no LoRA adapters (lora_A / lora_B keys) in this state dict")
    return base, adapters


def dit_state_key(reference_module: str) -> str:
    """The vlt name of one reference module path (e.g. `transformer.blocks.3.attn.qkv`)."""
    return next(iter(rename({reference_module + ".weight": torch.empty(0)}, DIT_KEYS, what="LoRA layer")))[
        : -len(".weight")
    ]


def load_dit(cfg: DiTConfig, state: State) -> DiT:
    """A DiT of `cfg` with every key of `state` loaded strictly (no missing, no unexpected keys)."""
    dit = DiT(cfg)
    result = dit.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(
            f"DiT keys do not match: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return dit


def pattern_from_merge_table(table: Mapping[int, Any], *, ks: list[int] | None = None) -> MergePattern:
    """The reference merge table {K: (Gbar (N, K), sizes (K,))} as a MergePattern (kind "lgm").

    Each row of Gbar has one non-zero entry (the slot's group); the sizes must be its column counts."""
    assign = {}
    for k in sorted(int(k) for k in table) if ks is None else ks:
        if k not in table:
            raise ConversionError(f"the merge table has no K={k}; it holds {sorted(table)}")
        gbar, sizes = (torch.as_tensor(t).float() for t in table[k])
        if (
            gbar.ndim != 2
            or gbar.shape[1] != k
            or not torch.equal((gbar > 0).sum(1), torch.ones(len(gbar)).long())
        ):
            raise ConversionError(f"merge table K={k}: expected (N, {k}) with one group per slot")
        a = gbar.argmax(1)  # (N,)
        if not torch.equal(torch.bincount(a, minlength=k).float(), sizes.flatten()):
            raise ConversionError(f"merge table K={k}: sizes do not match the assignment's group counts")
        assign[k] = a
    n = len(next(iter(assign.values())))
    return MergePattern(n, assign, kind="lgm")


def stats_from_reference(stats: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Channel mean and std (C,) from the reference's `latents_stats.pt` ({"mean", "std"}: (1, 1, C))."""
    if "mean" not in stats or "std" not in stats:
        raise ConversionError(f"latent statistics need 'mean' and 'std', got {sorted(stats)}")
    return torch.as_tensor(stats["mean"]).float().flatten(), torch.as_tensor(stats["std"]).float().flatten()


def lora_rank(adapters: State) -> int:
    ranks = {v.shape[0] for k, v in adapters.items() if k.endswith(".a")}
    if len(ranks) != 1:
        raise ConversionError(f"LoRA adapters of mixed ranks {sorted(ranks)}")
    return ranks.pop()


def dit_from_reference(
    state: Mapping[str, Tensor], *, lora: Mapping[int, State] | None = None, lora_alpha: float | None = None
) -> DiT:
    """A vlt DiT from a reference LightningDiT state dict, with vlt adapter tensors per K (`lora`:
    {K: adapters}, as `split_peft` returns) when given. `lora_alpha` None: alpha = rank, the
    reference's setting (r = alpha = 32: update scale 1)."""
    converted = dit_state_from_reference(state)
    overrides: dict[str, Any] = {}
    if lora:
        rank = lora_rank({k: v for part in lora.values() for k, v in part.items()})
        alpha = float(rank if lora_alpha is None else lora_alpha)
        overrides = {"lora_ks": sorted(lora), "lora_rank": rank, "lora_alpha": alpha}
        for part in lora.values():
            converted.update(part)
    return load_dit(dit_config_from_reference(state, **overrides), converted)


def generator_from_reference(
    dit: DiT,
    pattern: MergePattern,
    stats: tuple[Tensor, Tensor],
    *,
    flow: FlowSpec = PAPER_FLOW,
    tokenizer: Any | None = None,
) -> LatentGenerator:
    """A LatentGenerator around a converted DiT, the reference merge pattern and latent statistics.

    Args:
        dit: from `dit_from_reference`.
        pattern: from `pattern_from_merge_table` (N must match the DiT's).
        stats: (mean, std) of `stats_from_reference`.
        flow: sampling settings (default: the reference's XL protocol, `PAPER_FLOW`).
        tokenizer: a converted `VariableLengthTokenizer` to decode with (None: latents only).
    """
    gen = LatentGenerator(
        dit.cfg, pattern, flow=flow, tokenizer=tokenizer.cfg if tokenizer is not None else None
    )
    gen.dit.load_state_dict(dit.state_dict())
    with torch.no_grad():
        gen.latent_mean.copy_(stats[0])
        gen.latent_std.copy_(stats[1])
    if tokenizer is not None:
        gen.take_tokenizer(tokenizer, source="the converted reference tokenizer")
    return gen.eval()


# --- the tokenizer (`tokenizer.pt`: the reference's SoftVQModel2 with variable_method "ours2") ---
# The levels the reference cuts from its merge embeddings (extract_features.py writes these K).
REFERENCE_KS: tuple[int, ...] = (4, 8, 16, 32, 48, 64, 96, 128, 196, 256)
MERGE_BLOCKS = 4  # the reference merges inside 4 contiguous blocks of N/4 slots

# Parts of the reference training state that vlt's tokenizer has no use for: prefix -> what it is.
TOKENIZER_DROPPED: dict[str, str] = {
    "repa_model.": "the frozen DINOv2 teacher of the auxiliary feature loss",
    "decoder_dino.": "the auxiliary DINOv2-feature decoder (a training loss)",
    "post_quant_conv_dino.": "the auxiliary decoder's input projection",
    "to_pixel_dino.": "the auxiliary decoder's output projection",
    "projection.": "the REPA projector",
    "discriminator.": "the GAN discriminator",
    "quantize.codebook_used": "SoftVQ's log of recently used codebook entries",
    "encoder.mask_token": "the encoder's token-drop mask (training only)",
    "decoder.model.patch_embed.": "the decoder's patch embedding (unused: it reads mask tokens)",
    "encoder.model.head.": "a classifier head (unused)",
    "decoder.model.head.": "a classifier head (unused)",
}

# One-to-one renames of reference tokenizer keys (`tokenizer_state_from_reference` combines the rest).
TOKENIZER_KEYS: list[tuple[str, str]] = [
    (r"^(encoder|decoder)\.model\.blocks\.(\d+)\.", r"\1.blocks.\2."),
    (r"^(encoder|decoder)\.model\.norm\.", r"\1.norm."),
    (r"^encoder\.model\.patch_embed\.proj\.bias$", "patch_embed.bias"),
    (r"^quant_conv\.", "bottleneck.proj."),
    (r"^quantize\.embedding$", "bottleneck.codebook"),
    (r"^post_quant_conv\.", "latent_in."),
    (r"^decoder\.to_pixel\.model\.", "to_pixels."),
]
_ENCODER_VIT = "encoder.model."  # the reference encoder's timm ViT
# Keys that combine (a token and its position embedding) or change layout; all must be present.
_TOKENIZER_SPECIAL = (
    "encoder.model.patch_embed.proj.weight", "encoder.model.cls_token", "encoder.model.pos_embed",
    "encoder.latent_tokens", "encoder.latent_pos_embed", "decoder.model.cls_token",
    "decoder.model.pos_embed", "decoder.mask_token", "decoder.latent_pos_embed", "merge_module.embeddings",
)  # fmt: skip


class ReferenceTokenizer(NamedTuple):
    tokenizer: VariableLengthTokenizer  # the converted tokenizer, in eval mode
    dropped: dict[str, int]  # reference prefix -> how many tensors under it were left out


def tokenizer_state(ckpt: Mapping[str, Any], *, weights: str = "ema") -> State:
    """The state dict in a reference tokenizer checkpoint: `ema` (weights="ema", the one its
    extract_features.py and evaluate_tokenizer.py load) or `model`; a bare state dict as is."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if "ema" not in ckpt and "model" not in ckpt:
        return dict(ckpt)
    if ckpt.get(weights) is None:
        raise ConversionError(f"the tokenizer checkpoint has no {weights!r} weights")
    return dict(ckpt[weights])


def drop_training_parts(state: Mapping[str, Tensor]) -> tuple[State, dict[str, int]]:
    """(state without the `TOKENIZER_DROPPED` parts, {prefix: tensors dropped})."""
    kept, dropped = {}, {}
    for key, value in state.items():
        prefix = next((p for p in TOKENIZER_DROPPED if key.startswith(p)), None)
        if prefix is None:
            kept[key] = value
        else:
            dropped[prefix] = dropped.get(prefix, 0) + 1
    return kept, dropped


def _check_reference_args(args: Any) -> None:
    """Refuse reference tokenizers this converter does not reproduce (when the checkpoint says so)."""
    checks = {
        "vq_model": ("SoftVQ-2", "SoftVQ"), "variable_method": ("ours2",), "enc_type": ("vit",),
        "dec_type": ("vit",), "to_pixel": ("linear",), "codebook_l2_norm": (True,),
    }  # fmt: skip
    for name, allowed in checks.items():
        value = getattr(args, name, allowed[0])
        if value not in allowed:
            raise ConversionError(f"reference tokenizer with {name}={value!r}: only {allowed} convert")
    if "movq" in str(getattr(args, "decoder_model", "")):
        raise ConversionError("reference tokenizers with a MoVQ decoder do not convert")


def tokenizer_config_from_reference(
    state: Mapping[str, Tensor], args: Any = None, **overrides: Any
) -> TokenizerConfig:
    """The TokenizerConfig of a reference tokenizer state dict, read from its shapes; the SoftVQ
    temperature from its `args` (0.07, the released config, without them); heads = width / 64 (the
    head width of every DINOv2 ViT)."""
    missing = [k for k in _TOKENIZER_SPECIAL if k not in state]
    if missing:
        raise ConversionError(f"not a reference ViT tokenizer with merge embeddings: no {missing[:4]}")
    if args is not None:
        _check_reference_args(args)
    d, _, patch, _ = state["encoder.model.patch_embed.proj.weight"].shape
    g, v, c = state["quantize.embedding"].shape
    n_patches = state["encoder.model.pos_embed"].shape[1] - 1

    def depth(part: str) -> int:
        return 1 + max(
            int(m.group(1)) for k in state if (m := re.match(rf"{part}\.model\.blocks\.(\d+)\.", k))
        )

    ls = state.get("encoder.model.blocks.0.ls1.gamma")
    cfg = TokenizerConfig(
        image_size=patch * math.isqrt(n_patches), patch_size=patch, width=d,
        enc_depth=depth("encoder"), dec_depth=depth("decoder"), heads=d // 64,
        mlp_ratio=state["encoder.model.blocks.0.mlp.fc1.weight"].shape[0] / d,
        n_slots=state["encoder.latent_tokens"].shape[1], channels=c, bottleneck="softvq",
        codebooks=g, codebook_size=v, codebook_tau=float(getattr(args, "tau", 0.07)), init="paper",
        cls_token=True, layer_scale=1e-5 if ls is not None else None, norm_eps=1e-6,
    )  # fmt: skip
    return replace(cfg, **overrides)


def _with_position(token: Tensor, pos: Tensor) -> Tensor:
    """A reference token (1, 1, D) plus the first row of its pos_embed (1, 1 + P, D) -> (1, D)."""
    return (token[0] + pos[0, :1]).reshape(1, -1)


def vit_encoder_state(vit: Mapping[str, Tensor], *, what: str = "reference tokenizer") -> State:
    """A timm / DINOv2 ViT state dict (`patch_embed.proj.*`, `cls_token`, `pos_embed` (1, 1 + P, D),
    `blocks.i.*`, `norm.*`; no prefix) as the encoder keys of vlt's `Tokenizer` with a cls token
    (`patch_embed.*`, `enc_pos`, `enc_cls`, `encoder.*`). The reference tokenizer's encoder is such a ViT
    (under `encoder.model.`), and so is a DINOv2 checkpoint (`vlt.stages.dinov2`). A key with no
    counterpart is a ConversionError."""
    special = ("patch_embed.proj.weight", "cls_token", "pos_embed")
    missing = [k for k in special if k not in vit]
    if missing:
        raise ConversionError(f"{what}: not a ViT with a cls token: no {missing}")
    out = rename(
        {f"{_ENCODER_VIT}{k}": v for k, v in vit.items() if k not in special}, TOKENIZER_KEYS, what=what
    )
    pos, w = vit["pos_embed"], vit["patch_embed.proj.weight"]  # w (D, 3, s, s): a conv over (c s1 s2)
    out["patch_embed.weight"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (D, s s 3): vlt's (s1 s2 c)
    out["enc_pos"] = pos[0, 1:]  # (P, D)
    out["enc_cls"] = _with_position(vit["cls_token"], pos)  # (1, D)
    return out


def tokenizer_state_from_reference(state: Mapping[str, Tensor]) -> tuple[State, Tensor]:
    """(the vlt `Tokenizer` state dict, the merge embeddings (N, E)) of a reference tokenizer state dict
    without its training-only parts (see the module docstring for the mapping)."""
    encoder = {k[len(_ENCODER_VIT) :]: v for k, v in state.items() if k.startswith(_ENCODER_VIT)}
    special = {k: state[k] for k in _TOKENIZER_SPECIAL if not k.startswith(_ENCODER_VIT)}
    rest = {k: v for k, v in state.items() if k not in special and not k.startswith(_ENCODER_VIT)}
    out = vit_encoder_state(encoder) | rename(rest, TOKENIZER_KEYS, what="reference tokenizer")
    dec_pos = special["decoder.model.pos_embed"]
    out |= {
        "slots": special["encoder.latent_tokens"][0] + special["encoder.latent_pos_embed"][0],
        "dec_pos": dec_pos[0, 1:],
        "dec_cls": _with_position(special["decoder.model.cls_token"], dec_pos),
        "mask_token": special["decoder.mask_token"].reshape(-1),
        "slot_pos": special["decoder.latent_pos_embed"][0],
    }
    return out, special["merge_module.embeddings"]


def tokenizer_from_reference(
    state: Mapping[str, Tensor], *, args: Any = None, ks: tuple[int, ...] = REFERENCE_KS, **overrides: Any
) -> ReferenceTokenizer:
    """A VariableLengthTokenizer from a reference tokenizer state dict (`tokenizer_state`).

    The `TOKENIZER_DROPPED` parts are left out (and counted); any other key with no vlt counterpart,
    and any vlt key left unfilled, is a ConversionError. The merge pattern is cut from the merge
    embeddings as the reference cuts them: average linkage on 1 - cos inside 4 blocks of N/4 slots,
    at every K of `ks` (N and K above N are skipped)."""
    kept, dropped = drop_training_parts(state)
    cfg = tokenizer_config_from_reference(kept, args, **overrides)
    net_state, e = tokenizer_state_from_reference(kept)
    levels = [k for k in ks if k <= cfg.n_slots]
    pattern = MergePattern(cfg.n_slots, hierarchy(e.float(), levels, blocks=MERGE_BLOCKS), kind="lgm")
    tok = VariableLengthTokenizer(cfg, pattern)
    result = tok.net.load_state_dict(net_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(
            f"tokenizer keys do not match: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return ReferenceTokenizer(tok.eval(), dropped)
