"""Converters from the reference implementation's layouts: keys and shapes as the reference names them
(built here at reduced size), a strict load, and outputs equal to an independent re-implementation of
the reference forward pass on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlt.models.pattern import MergePattern
from vlt.models.registry import preset_config
from vlt.stages import export, load
from vlt.stages.reference import (
    ConversionError,
    dit_config_from_reference,
    dit_from_reference,
    generator_from_reference,
    pattern_from_merge_table,
    stats_from_reference,
)

N, C, D, DEPTH, HEADS, CLASSES = 16, 8, 64, 2, 4, 10
HIDDEN = int(2 / 3 * D * 4)  # the reference's SwiGLU width for mlp_ratio 4
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")


# --- the reference LightningDiT's state dict (1D latents), by its key names and shapes ---
def reference_dit_shapes(n=N, c=C, d=D, depth=DEPTH, heads=HEADS, classes=CLASSES, hidden=HIDDEN) -> dict:
    shapes = {
        "pos_embed": (1, n, d),
        "x_embedder.weight": (d, c), "x_embedder.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.norm.weight": (d,),
        "final_layer.linear.weight": (c, d), "final_layer.linear.bias": (c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }  # fmt: skip
    for i in range(depth):
        b = f"transformer.blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,), b + "norm2.weight": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.q_norm.weight": (d // heads,), b + "attn.k_norm.weight": (d // heads,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.w12.weight": (2 * hidden, d), b + "mlp.w12.bias": (2 * hidden,),
            b + "mlp.w3.weight": (d, hidden), b + "mlp.w3.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        }  # fmt: skip
    return shapes


def random_state(shapes: dict, seed: int = 0) -> dict:
    """Random weights, norms around 1, every branch open (no zero-initialised gates)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=g) / math.sqrt(shape[-1] if len(shape) > 1 else 1) * 0.5
        state[key] = 1 + 0.1 * torch.randn(shape, generator=g) if "norm" in key else value
    return state


# --- an independent re-implementation of the reference forward pass (LightningDiT `net`) ---
def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * w


def linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def timestep_features(t, dim=256):
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def reference_attention(sd, b, x, sizes, heads, lora=None):
    bs, n, d = x.shape
    qkv = lin(sd, b + "attn.qkv", x, lora).reshape(bs, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = rms(qkv[0], sd[b + "attn.q_norm.weight"]), rms(qkv[1], sd[b + "attn.k_norm.weight"]), qkv[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // heads) + sizes.float().log()[None, None, None, :]
    out = logits.softmax(-1) @ v  # (B, H, L, E)
    return lin(sd, b + "attn.proj", out.transpose(1, 2).reshape(bs, n, d), lora)


def reference_mlp(sd, b, x, lora=None):
    a, g = lin(sd, b + "mlp.w12", x, lora).chunk(2, -1)
    return lin(sd, b + "mlp.w3", F.silu(a) * g, lora)


def lin(sd, name, x, lora=None):
    """A linear with the PEFT update B A x (scale 1) when `lora` holds the layer's (A, B)."""
    out = linear(sd, name, x)
    if lora and name in lora:
        a, bb = lora[name]
        out = out + x @ a.T @ bb.T
    return out


def reference_forward(sd, x, t, y, proj_mat, sizes, heads=HEADS, depth=DEPTH, lora=None):
    """LightningDiT.net on 1D tokens; `lora`: {reference layer name: (A, B)}, PEFT's update at scale 1."""
    pos = torch.einsum("bnd,nm->bmd", sd["pos_embed"], proj_mat)
    h = linear(sd, "x_embedder", x) + pos
    temb = linear(sd, "t_embedder.mlp.2", F.silu(linear(sd, "t_embedder.mlp.0", timestep_features(t))))
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    for i in range(depth):
        b = f"transformer.blocks.{i}."
        mods = linear(sd, b + "adaLN_modulation.1", F.silu(c)).chunk(6, -1)
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mods)
        attn_in = rms(h, sd[b + "norm1.weight"]) * (1 + sc1) + sh1
        h = h + g1 * reference_attention(sd, b, attn_in, sizes, heads, lora)
        h = h + g2 * reference_mlp(sd, b, rms(h, sd[b + "norm2.weight"]) * (1 + sc2) + sh2, lora)
    shift, scale = (m[:, None] for m in linear(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, -1))
    return linear(sd, "final_layer.linear", rms(h, sd["final_layer.norm.weight"]) * (1 + scale) + shift)


def uneven_pattern(k: int = 5, seed: int = 1) -> MergePattern:
    """K groups of unequal sizes over scattered slots (so the log m_j bias matters)."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.cat([torch.arange(k), torch.randint(0, k, (N - k,), generator=g)])
    return MergePattern(N, {k: groups[torch.randperm(N, generator=g)], N: torch.arange(N)})


def inputs(k: int, b: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, k, C, generator=g),
        torch.rand(b, generator=g),
        torch.randint(0, CLASSES, (b,), generator=g),
    )


# --- generator ---
def test_reference_dit_converts_with_every_key_and_matches_the_reference_forward():
    sd = random_state(reference_dit_shapes())
    dit = dit_from_reference(sd).eval()  # strict: raises on a missing or unexpected key
    assert dit.cfg.norm_affine and dit.cfg.t_scale == 1.0 and dit.cfg.heads == HEADS
    assert sum(p.numel() for p in dit.parameters()) == sum(v.numel() for v in sd.values())
    pattern = uneven_pattern()
    for k in (5, N):
        x, t, y = inputs(k)
        ours = dit(x, t, y, pattern.gbar(k), pattern.sizes(k))
        ref = reference_forward(sd, x, t, y, pattern.gbar(k), pattern.sizes(k))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_xl_shapes_give_the_lgm_xl_preset():
    shapes = reference_dit_shapes(
        n=256, c=32, d=1152, depth=28, heads=16, classes=1000, hidden=int(2 / 3 * 1152 * 4)
    )
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert dit_config_from_reference(state) == preset_config("dit", "lgm-xl")


def test_unknown_reference_key_is_an_error():
    sd = random_state(reference_dit_shapes())
    sd["transformer.blocks.0.ls1.gamma"] = torch.ones(D)
    with pytest.raises(ConversionError, match=r"ls1\.gamma"):
        dit_from_reference(sd)


def test_merge_table_and_stats_convert():
    pattern = uneven_pattern()
    table = {k: (pattern.gbar(k), pattern.sizes(k)) for k in pattern.ks}  # the reference's ours2-d32.pt
    assert pattern_from_merge_table(table).equal(pattern)
    bad = {5: (pattern.gbar(5), pattern.sizes(5) + 1)}
    with pytest.raises(ConversionError, match="sizes"):
        pattern_from_merge_table(bad)
    mean, std = stats_from_reference({"mean": torch.ones(1, 1, C), "std": 2 * torch.ones(1, 1, C)})
    assert mean.shape == std.shape == (C,)


def test_converted_generator_exports_and_loads(tmp_path):
    sd = random_state(reference_dit_shapes())
    pattern = uneven_pattern()
    stats = (torch.randn(C), torch.rand(C) + 0.5)
    gen = generator_from_reference(dit_from_reference(sd), pattern, stats)
    again = load(export(gen, tmp_path / "generator"))
    assert again.spec.sample_steps == 24 and again.spec.timestep_shift == 0.3  # 25 grid points
    assert again.spec.scale_at(32) == 10.5 and again.spec.cfg_interval == (0.1, 1.0)
    x, t, y = inputs(5)
    args = (x, t, y, pattern.gbar(5), pattern.sizes(5))
    torch.testing.assert_close(again.dit(*args), gen.dit(*args))
    torch.testing.assert_close(again.latent_std, stats[1])


def test_vlt_convert_writes_exports_that_match_the_reference(tmp_path):
    """`vlt convert` on files saved in the reference's layouts: a training checkpoint (model +
    model_ema), a PEFT LoRA checkpoint, the merge table and the latent statistics."""
    from tests.test_lora import peft_state
    from vlt.cli import main as vlt

    sd, ema = random_state(reference_dit_shapes()), random_state(reference_dit_shapes(), seed=5)
    torch.save({"model": sd, "model_ema": ema, "epoch": 3}, tmp_path / "xl.pth")
    peft, pairs = peft_state(sd)
    torch.save({"model": peft, "model_ema": None, "epoch": 1}, tmp_path / "lora_5.pth")
    pattern = uneven_pattern()
    table = {k: (pattern.gbar(k), pattern.sizes(k)) for k in pattern.ks}
    torch.save(table, tmp_path / "merge.pt")
    torch.save({"mean": torch.zeros(1, 1, C), "std": torch.ones(1, 1, C)}, tmp_path / "stats.pt")
    out = tmp_path / "out"
    files = {"merge_table": "merge.pt", "stats": "stats.pt", "dit": "xl.pth"}
    options = [f"--{key}={tmp_path / name}" for key, name in files.items()]
    vlt(["convert", f"--out={out}", *options, "--lora", f"5={tmp_path / 'lora_5.pth'}"])
    x, t, y = inputs(5)
    args = (x, t, y, pattern.gbar(5), pattern.sizes(5))
    base, lora = load(out / "generator"), load(out / "lora_5" / "generator")
    assert base.pattern.equal(pattern) and lora.dit.cfg.lora_ks == [5]
    assert (base.spec.noise, base.spec.guidance) == ("pooled", "per_position")
    assert (lora.spec.noise, lora.spec.guidance, lora.spec.cfg_scale) == ("plain", "uniform", 2.0)
    torch.testing.assert_close(base.dit(*args), reference_forward(ema, *args), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        lora.dit(*args), reference_forward(sd, *args, lora=pairs), atol=1e-5, rtol=1e-4
    )


def test_legacy_sampling_options_plain_noise_and_uniform_guidance():
    """The reference's legacy protocol (for its LoRA files): N(0, I_K) start, CFG at w on every token."""
    from vlt.objectives.flow import RectifiedFlow

    pattern = uneven_pattern()
    gbar, sizes = pattern.gbar(5), pattern.sizes(5)
    model = _ConstantGuide()
    seen = model.seen
    eps = torch.randn(4000, N, C, generator=torch.Generator().manual_seed(0))
    flow, y = RectifiedFlow(), torch.zeros(4000, dtype=torch.long)
    for kind, var in (("pooled", 1 / sizes), ("plain", torch.ones(5))):
        seen.clear()
        flow.sample(model, y=y, gbar=gbar, sizes=sizes, steps=1, noise=eps, noise_kind=kind, null_label=1)
        torch.testing.assert_close(seen[0].var(dim=(0, 2)), var, atol=0.05, rtol=0.05)
    for guidance, scale in (("uniform", torch.full((5,), 3.0)), ("per_position", 1 + 2.0 / sizes)):
        out = flow.sample(model, y=y[:2], gbar=gbar, sizes=sizes, steps=1, cfg_scale=3.0, noise=eps[:2],
                          guidance=guidance, null_label=1)  # fmt: skip
        v = out - _start(eps[:2], gbar)  # one Euler step over [0, 1]: x1 = x0 + v
        torch.testing.assert_close(v, scale[None, :, None].expand(2, 5, C))


def _start(eps, gbar):
    return torch.einsum("bnc,nk->bkc", eps, gbar)


class _ConstantGuide(torch.nn.Module):
    """v_cond = 1 (label 0), v_uncond = 0 (the null label 1); records the inputs it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.cfg = type("Cfg", (), {"channels": C})()
        self.null_label = 1

    def forward(self, x, t, y, gbar, sizes):
        self.seen.append(x.clone())
        return torch.where((y == 0)[:, None, None], torch.ones_like(x), torch.zeros_like(x))
