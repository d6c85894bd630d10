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
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlt.models.dit import DiT, DiTConfig
from vlt.models.pattern import MergePattern
from vlt.objectives.flow import FlowSpec
from vlt.stages.generator import LatentGenerator

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
