"""Registry contract: every registered tokenizer preset builds, runs forward and backward, and every
parameter gets a finite gradient."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch

from vlt.models import create, expand_presets, list_presets, preset_config, register

# Full-size s/b (256x256, N=256, 24 blocks) are too slow for a 2-core unit test: same structure,
# smaller image, fewer slots and blocks. The real configs are built once below.
SMALL = {"image_size": 64, "n_slots": 16, "enc_depth": 1, "dec_depth": 1}


@pytest.mark.parametrize("name", list_presets("tokenizer"))
def test_tokenizer_preset_contract(name: str) -> None:
    torch.manual_seed(0)
    tok = create("tokenizer", name, **({} if name == "tiny" else SMALL)).train()
    size = tok.cfg.image_size
    x = torch.rand(2, 3, size, size) * 2 - 1
    enc = tok.encode(x)
    assert enc.z.shape == (2, tok.cfg.n_slots, tok.cfg.channels)
    x_hat = tok.decode(enc.z)
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    ((x_hat - x).pow(2).mean() + 1e-6 * enc.kl).backward()
    missing = [n for n, p in tok.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize(("name", "params_m"), [("tiny", (0.1, 0.5)), ("s", (35, 50)), ("b", (160, 180))])
def test_real_presets_build(name: str, params_m: tuple[float, float]) -> None:
    tok = create("tokenizer", name)
    n = sum(p.numel() for p in tok.parameters()) / 1e6
    assert params_m[0] < n < params_m[1], n
    if name != "tiny":
        assert (tok.cfg.image_size, tok.cfg.patch_size, tok.cfg.n_slots) == (256, 16, 256)
        assert tok.cfg.bottleneck == "kl" and tok.cfg.init == "paper"


def test_lgm_b_preset_is_the_reference_tokenizer_shape() -> None:
    tok = create("tokenizer", "lgm-b")
    n = sum(p.numel() for p in tok.parameters()) / 1e6
    assert 170 < n < 180, n  # two DINOv2 ViT-Bs + 4 x 8192 x 32 codebook entries
    assert tok.bottleneck.codebook.shape == (4, 8192, 32) and tok.encoder.blocks[0].ls1.gamma.shape == (768,)
    assert tok.encoder.norm.eps == 1e-6 and tok.enc_cls.shape == tok.dec_cls.shape == (1, 768)


@pytest.mark.slow
def test_s_preset_full_size_forward() -> None:
    tok = create("tokenizer", "s").eval()
    with torch.no_grad():
        x_hat = tok(torch.zeros(1, 3, 256, 256))
    assert x_hat.shape == (1, 3, 256, 256) and torch.isfinite(x_hat).all()


def test_registry_errors_and_overrides() -> None:
    assert "tiny" in list_presets("tokenizer") and list_presets("no-such-kind") == []
    with pytest.raises(ValueError, match="unknown tokenizer preset 'nope'"):
        create("tokenizer", "nope")
    assert create("tokenizer", "tiny", width=32, n_slots=8).cfg.n_slots == 8
    with pytest.raises(ValueError, match="already registered"):
        register("tokenizer", "tiny")(lambda: None)


def test_expand_presets_fills_every_field_and_keeps_the_listed_ones() -> None:
    tree = {
        "model": {"init_args": {"tokenizer_config": {"preset": "s", "width": "${w}"}, "dit": {"depth": 2}}},
        "callbacks": [{"dit": {"preset": "tiny"}}],
    }
    out = expand_presets(tree)
    tok = out["model"]["init_args"]["tokenizer_config"]
    assert tok == {**asdict(preset_config("tokenizer", "s")), "width": "${w}"}  # interpolations kept
    assert out["model"]["init_args"]["dit"] == {"depth": 2}  # no preset named: left as written
    assert out["callbacks"][0]["dit"] == asdict(preset_config("dit", "tiny"))
    with pytest.raises(ValueError, match=re.escape("merge: {preset: ...} names no preset kind")):
        expand_presets({"merge": {"preset": "s"}})
    with pytest.raises(ValueError, match=r"tokenizer preset 'b' has no fields \['depth'\]"):
        preset_config("tokenizer", "b", depth=3)
