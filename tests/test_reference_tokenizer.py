"""The reference tokenizer converter (`tokenizer.pt`: SoftVQModel2 on timm DINOv2 ViTs): a state dict
in the reference's key layout (built here at reduced size, with its training-only parts), a strict
load, and encode / merge / decode equal to an independent re-implementation of the reference forward
pass on the same weights (its SoftVQ, its sklearn clustering of the merge embeddings, its ViTs)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering

from tests.test_reference import C, N, random_state, reference_dit_shapes
from vlt.stages import load
from vlt.stages.reference import ConversionError, tokenizer_from_reference

# Width 128: the converter reads heads = width / 64 (DINOv2's head width), so 2 heads here.
D, HEADS, DEPTH, IMAGE, PATCH, G, V, E, TAU = 128, 2, 2, 32, 8, 4, 32, 12, 0.07
P = (IMAGE // PATCH) ** 2
ARGS = argparse.Namespace(vq_model="SoftVQ-2", variable_method="ours2", tau=TAU, codebook_l2_norm=True)


# --- the reference tokenizer's state dict, by its key names and shapes ---
def _vit_shapes(prefix: str, depth: int = DEPTH) -> dict:
    shapes = {
        f"{prefix}.cls_token": (1, 1, D), f"{prefix}.pos_embed": (1, 1 + P, D),
        f"{prefix}.patch_embed.proj.weight": (D, 3, PATCH, PATCH), f"{prefix}.patch_embed.proj.bias": (D,),
        f"{prefix}.norm.weight": (D,), f"{prefix}.norm.bias": (D,),
    }  # fmt: skip
    for i in range(depth):
        b = f"{prefix}.blocks.{i}."
        shapes |= {
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "ls1.gamma": (D,), b + "ls2.gamma": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
        }  # fmt: skip
    return shapes


def reference_tokenizer_shapes(training_parts: bool = True) -> dict:
    shapes = _vit_shapes("encoder.model") | _vit_shapes("decoder.model")
    shapes |= {
        "encoder.latent_tokens": (1, N, D), "encoder.latent_pos_embed": (1, N, D),
        "quant_conv.weight": (C, D), "quant_conv.bias": (C,), "quantize.embedding": (G, V, C),
        "post_quant_conv.weight": (D, C), "post_quant_conv.bias": (D,),
        "decoder.mask_token": (1, 1, D), "decoder.latent_pos_embed": (1, N, D),
        "decoder.to_pixel.model.weight": (3 * PATCH**2, D), "decoder.to_pixel.model.bias": (3 * PATCH**2,),
        "merge_module.embeddings": (N, E),
    }  # fmt: skip
    if training_parts:  # the frozen teacher, the auxiliary decoder and SoftVQ's usage log
        shapes |= {
            "quantize.codebook_used": (G, 64), "repa_model.blocks.0.attn.qkv.weight": (3 * D, D),
            "repa_model.pos_embed": (1, 1 + P, D), "decoder_dino.model.blocks.0.norm1.weight": (D,),
            "post_quant_conv_dino.weight": (D, C), "to_pixel_dino.weight": (D, D),
        }  # fmt: skip
    return shapes


def reference_tokenizer_state(seed: int = 0) -> dict:
    """Random weights; merge embeddings of four well-separated groups per block (no near ties)."""
    sd = random_state(reference_tokenizer_shapes(), seed=seed)
    g = torch.Generator().manual_seed(seed)
    for key in sd:
        if key.endswith(("ls1.gamma", "ls2.gamma")):  # open the branches (DINOv2 starts them at 1e-5)
            sd[key] = 0.5 + 0.5 * torch.rand(D, generator=g)
    sd["merge_module.embeddings"] = torch.randn(N, E, generator=g)
    return sd


# --- an independent re-implementation of the reference forward pass ---
def layer_norm(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def reference_vit(sd, prefix, x, heads=HEADS, depth=DEPTH):
    """timm's DINOv2 blocks: x + ls1 * attn(LN x), x + ls2 * mlp(LN x), then the final LN."""
    bs, n, d = x.shape
    for i in range(depth):
        b = f"{prefix}.blocks.{i}."
        qkv = linear(sd, b + "attn.qkv", layer_norm(sd, b + "norm1", x))
        q, k, v = qkv.reshape(bs, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        out = linear(sd, b + "attn.proj", (attn @ v).transpose(1, 2).reshape(bs, n, d))
        x = x + sd[b + "ls1.gamma"] * out
        hidden = F.gelu(linear(sd, b + "mlp.fc1", layer_norm(sd, b + "norm2", x)))
        x = x + sd[b + "ls2.gamma"] * linear(sd, b + "mlp.fc2", hidden)
    return layer_norm(sd, f"{prefix}.norm", x)


def reference_encode(sd, images):
    """TimmViTEncoder -> quant_conv -> SoftVectorQuantizer (l2-normalised, eval)."""
    bs = images.shape[0]
    w, b = sd["encoder.model.patch_embed.proj.weight"], sd["encoder.model.patch_embed.proj.bias"]
    x = F.conv2d(images, w, b, stride=PATCH).flatten(2).transpose(1, 2)  # (B, P, D)
    x = torch.cat([sd["encoder.model.cls_token"].expand(bs, -1, -1), x], 1) + sd["encoder.model.pos_embed"]
    latents = (sd["encoder.latent_tokens"] + sd["encoder.latent_pos_embed"]).expand(bs, -1, -1)
    h = reference_vit(sd, "encoder.model", torch.cat([x, latents], 1))[:, -N:]
    z = linear(sd, "quant_conv", h)
    segments = F.normalize(z.view(bs, G, N // G, C), dim=-1)
    emb = F.normalize(sd["quantize.embedding"], dim=-1)
    flat = segments.permute(1, 0, 2, 3).reshape(G, -1, C)
    probs = torch.softmax(torch.einsum("nbe,nke->nbk", flat, emb) / TAU, -1)
    zq = torch.einsum("nbk,nke->nbe", probs, emb).view(G, bs, N // G, C).permute(1, 0, 2, 3)
    return zq.reshape(bs, N, C)


def reference_labels(sd, k):
    """MergeModule in eval: sklearn average linkage on 1 - cos, cross-block similarity -100."""
    metric = F.normalize(sd["merge_module.embeddings"].float(), dim=-1)
    mask = torch.block_diag(*[torch.ones(N // 4, N // 4)] * 4)
    scores = (1 - (metric @ metric.T * mask + (1 - mask) * -100.0)).numpy()
    clustering = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
    return torch.as_tensor(clustering.fit(scores).labels_)


def reference_merge(sd, z, k):
    if k == N:
        return z
    da = F.one_hot(reference_labels(sd, k), k).float()
    mat = (da / da.sum(0, keepdim=True)) @ da.T
    return torch.einsum("bnc,nm->bmc", z, mat)


def reference_decode(sd, zq):
    """post_quant_conv -> TimmViTDecoder (cls + mask tokens, then latents) -> ToPixel (linear)."""
    bs = zq.shape[0]
    z = linear(sd, "post_quant_conv", zq) + sd["decoder.latent_pos_embed"]
    x = sd["decoder.mask_token"].expand(bs, P, -1)
    x = torch.cat([sd["decoder.model.cls_token"].expand(bs, -1, -1), x], 1) + sd["decoder.model.pos_embed"]
    x = reference_vit(sd, "decoder.model", torch.cat([x, z], 1))[:, 1 : 1 + P]
    out = linear(sd, "decoder.to_pixel.model", x)
    h = int(math.sqrt(P))
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(bs, h, h, PATCH, PATCH, 3))
    return out.reshape(bs, 3, h * PATCH, h * PATCH)


def images(b: int = 2, seed: int = 3):
    return torch.rand(b, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_matches_reference(tok, sd, x) -> None:
    with torch.no_grad():
        torch.testing.assert_close(tok.encode(x), reference_encode(sd, x), atol=1e-5, rtol=1e-4)
        for k in (4, 8, N):
            ref = reference_decode(sd, reference_merge(sd, reference_encode(sd, x), k))
            torch.testing.assert_close(tok.reconstruct(x, k), ref, atol=1e-5, rtol=1e-4)


# --- tests ---
def test_reference_tokenizer_converts_with_every_key_and_matches_the_reference_forward():
    sd = reference_tokenizer_state()
    tok, dropped = tokenizer_from_reference(sd, args=ARGS)  # strict: raises on a bad key
    assert set(dropped) == {"quantize.codebook_used", "repa_model.", "decoder_dino.", "post_quant_conv_dino.",
                            "to_pixel_dino.", "decoder.model.patch_embed."}  # fmt: skip
    cfg = tok.cfg
    assert (cfg.bottleneck, cfg.codebooks, cfg.codebook_size, cfg.codebook_tau) == ("softvq", G, V, TAU)
    assert (cfg.image_size, cfg.patch_size, cfg.n_slots, cfg.cls_token, cfg.norm_eps) == (
        IMAGE,
        PATCH,
        N,
        True,
        1e-6,
    )
    # every kept reference tensor lands in vlt, less the ones folded together (token + its position
    # embedding: two cls tokens, the N latent tokens) and the merge embeddings (they became the pattern)
    kept = sum(v.numel() for k, v in sd.items() if not any(k.startswith(p) for p in dropped))
    folded = 2 * D + N * D + N * E
    assert sum(p.numel() for p in tok.net.parameters()) == kept - folded
    for k in tok.ks:  # the pattern: the reference's own clustering, partition for partition
        ours, ref = tok.pattern.assignment(k), reference_labels(sd, k)
        assert len({(int(a), int(b)) for a, b in zip(ours, ref, strict=True)}) == k
    assert tok.ks == [4, 8, N]
    assert_matches_reference(tok, sd, images())


def test_unknown_or_unused_reference_keys_are_errors():
    sd = reference_tokenizer_state()
    with pytest.raises(ConversionError, match=r"extra_head\.weight"):
        tokenizer_from_reference({**sd, "extra_head.weight": torch.ones(3)})
    q_norm = {**sd, "encoder.model.blocks.0.attn.q_norm.weight": torch.ones(D // HEADS)}
    with pytest.raises(ConversionError, match=r"q_norm"):  # renamed, but vlt's block has no q_norm here
        tokenizer_from_reference(q_norm)
    del sd["decoder.latent_pos_embed"]
    with pytest.raises(ConversionError, match="latent_pos_embed"):
        tokenizer_from_reference(sd)


def test_reference_args_name_what_converts():
    sd = reference_tokenizer_state()
    for bad in ({"vq_model": "VQ-16"}, {"codebook_l2_norm": False}, {"decoder_model": "vit_b_dinov2_movq"}):
        with pytest.raises(ConversionError, match="convert"):
            tokenizer_from_reference(sd, args=argparse.Namespace(**(vars(ARGS) | bad)))
    tok = tokenizer_from_reference(sd, args=argparse.Namespace(**(vars(ARGS) | {"tau": 0.2})))
    assert tok.tokenizer.cfg.codebook_tau == 0.2


def test_vlt_convert_tokenizer_alone_and_inside_the_generator(tmp_path):
    """`vlt convert --tokenizer` on a checkpoint saved as the reference saves it (model, ema, args,
    discriminator), alone and with --dit: the generator export carries that tokenizer and decodes."""
    from vlt.cli import main as vlt

    sd, ema = reference_tokenizer_state(), reference_tokenizer_state(seed=7)
    args = argparse.Namespace(**vars(ARGS))
    ckpt = {"model": sd, "ema": ema, "args": args, "steps": 10, "discriminator": {"w": torch.ones(2)}}
    torch.save(ckpt, tmp_path / "tokenizer.pt")
    torch.save(random_state(reference_dit_shapes()), tmp_path / "xl.pth")
    torch.save({"mean": torch.zeros(1, 1, C), "std": 2 * torch.ones(1, 1, C)}, tmp_path / "stats.pt")
    options = [f"--tokenizer={tmp_path / 'tokenizer.pt'}", f"--stats={tmp_path / 'stats.pt'}"]
    vlt(["convert", f"--out={tmp_path / 'alone'}", options[0]])
    assert_matches_reference(load(tmp_path / "alone" / "tokenizer"), ema, images())  # the EMA weights
    vlt(["convert", f"--out={tmp_path / 'out'}", *options, f"--dit={tmp_path / 'xl.pth'}"])
    tok, gen = load(tmp_path / "out" / "tokenizer"), load(tmp_path / "out" / "generator")
    assert gen.tokenizer is not None and gen.pattern.equal(tok.pattern)
    x = images()
    torch.testing.assert_close(gen.tokenizer.encode(x), tok.encode(x))
    with torch.no_grad():
        assert gen.generate(torch.tensor([0, 1]), 4, steps=1).shape == (2, 3, IMAGE, IMAGE)
    # a merge table beside the tokenizer must hold the same pattern
    table = {k: (tok.pattern.gbar(k), tok.pattern.sizes(k)) for k in tok.ks}
    torch.save(table, tmp_path / "merge.pt")
    both = [*options, f"--dit={tmp_path / 'xl.pth'}", f"--merge_table={tmp_path / 'merge.pt'}"]
    vlt(["convert", f"--out={tmp_path / 'both'}", *both])
    assert load(tmp_path / "both" / "generator").pattern.equal(tok.pattern)
    interleaved = F.one_hot(torch.arange(N) % 8, 8).float()  # groups across the blocks: never a cut
    table[8] = (interleaved / (N // 8), torch.full((8,), N / 8))
    torch.save(table, tmp_path / "merge.pt")
    with pytest.raises(ValueError, match="merge pattern mismatch"):
        vlt(["convert", f"--out={tmp_path / 'bad'}", *both])
    with pytest.raises(ValueError, match="--merge_table or --tokenizer"):
        vlt(["convert", f"--out={tmp_path / 'bad'}", f"--dit={tmp_path / 'xl.pth'}", options[1]])
