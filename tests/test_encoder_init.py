"""DINOv2 initialisation of the stage-1 encoder: a state dict in the public DINOv2 key layout (reduced
size, random values) loads into every encoder key and nothing else, the encoder then computes the DINOv2
forward pass (the reference converter tests' oracle), position grids and patch sizes are resampled, and a
wrong size or a missing file is refused at construction with the key, the path and the fix."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from tests.test_reference import random_state
from tests.test_reference_tokenizer import DEPTH, HEADS, D, _vit_shapes, reference_vit
from vlt.lit import LitTokenizer
from vlt.models.dino import resample_patch_kernel, resample_pos_embed
from vlt.models.tokenizer import Tokenizer, TokenizerConfig
from vlt.specs import MergeSpec
from vlt.stages.dinov2 import init_encoder

IMAGE, PATCH, SLOTS = 32, 8, 8
CFG = TokenizerConfig(
    image_size=IMAGE, patch_size=PATCH, width=D, enc_depth=DEPTH, dec_depth=1, heads=HEADS, n_slots=SLOTS,
    channels=4, cls_token=True, layer_scale=1e-5, norm_eps=1e-6,
)  # fmt: skip
MERGE = MergeSpec(grid=[2, 4, 8], embed_dim=8)


def dinov2_state(grid: int = IMAGE // PATCH, patch: int = PATCH, seed: int = 0) -> dict:
    """Random DINOv2 weights in its own key names (no prefix), with registers and the mask token."""
    shapes = {k.removeprefix("dino."): v for k, v in _vit_shapes("dino").items()}
    shapes |= {"pos_embed": (1, 1 + grid * grid, D), "patch_embed.proj.weight": (D, 3, patch, patch)}
    shapes |= {"register_tokens": (1, 4, D), "mask_token": (1, D)}
    return random_state(shapes, seed=seed)


def save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def encoder_slots(tok: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    """The encoder's N slot outputs (B, N, D), as they enter the bottleneck."""
    seen = []
    hook = tok.bottleneck.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        tok.encode(images)
    finally:
        hook.remove()
    return seen[0]


def dinov2_slots(sd: dict, tok: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    """DINOv2's forward on [cls, patches, the tokenizer's slots]: conv patch embedding, pos_embed added
    to cls and patches, the reference oracle's blocks (pre-norm, qkv split, LayerScale), final norm."""
    b = images.shape[0]
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    seq = torch.cat([x, tok.slots.detach().expand(b, -1, -1)], 1)
    return reference_vit({f"dino.{k}": v for k, v in sd.items()}, "dino", seq)[:, -SLOTS:]


def test_dinov2_keys_fill_the_encoder_and_it_computes_the_dinov2_forward(tmp_path):
    sd = dinov2_state()
    torch.manual_seed(0)
    tok, fresh = Tokenizer(CFG), Tokenizer(CFG)
    fresh.load_state_dict(tok.state_dict())
    report = init_encoder(tok, save(sd, tmp_path / "dinov2.pth"))
    assert report.dropped == ["mask_token", "register_tokens"] and report.grid == (4, 4)
    encoder = [k for k in tok.state_dict() if k.startswith(("patch_embed.", "enc_", "encoder."))]
    assert report.loaded == len(encoder)
    for key, value in tok.state_dict().items():  # the encoder changed, nothing else did
        assert torch.equal(value, fresh.state_dict()[key]) != (key in encoder), key
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            encoder_slots(tok, images), dinov2_slots(sd, tok, images), atol=1e-5, rtol=1e-4
        )


def test_position_grid_is_resized_bicubically_in_raster_order(tmp_path):
    sd = dinov2_state(grid=8)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    sd["pos_embed"][0, 1:, 0], sd["pos_embed"][0, 1:, 1] = rows.flatten(), cols.flatten()
    tok = Tokenizer(CFG)
    assert init_encoder(tok, save(sd, tmp_path / "dinov2.pth")).grid == (8, 4)
    grid = sd["pos_embed"][0, 1:].reshape(1, 8, 8, D).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(tok.enc_pos, expected.permute(0, 2, 3, 1).reshape(16, D))
    row, col = tok.enc_pos[:, 0].reshape(4, 4), tok.enc_pos[:, 1].reshape(4, 4)
    assert (row.diff(dim=0) > 0).all() and row.diff(dim=1).abs().max() < 1e-5  # rows down, cols across
    assert (col.diff(dim=1) > 0).all() and col.diff(dim=0).abs().max() < 1e-5
    torch.testing.assert_close(tok.enc_cls, sd["cls_token"][0] + sd["pos_embed"][0, :1])  # cls row kept
    assert resample_pos_embed(sd["pos_embed"], 8) is sd["pos_embed"]


def test_patch_kernel_resize_keeps_every_patch_embedding(tmp_path):
    w = torch.randn(D, 3, 4, 4)
    new = resample_patch_kernel(w, PATCH)
    patches = torch.randn(5, 3, 4, 4)
    upsampled = F.interpolate(
        patches, size=(PATCH, PATCH), mode="bicubic", align_corners=False, antialias=True
    )
    torch.testing.assert_close(
        F.conv2d(upsampled, new).flatten(1), F.conv2d(patches, w).flatten(1), atol=1e-4, rtol=1e-4
    )
    tok = Tokenizer(CFG)  # a patch-4 file into the patch-8 encoder
    assert init_encoder(tok, save(dinov2_state(patch=4), tmp_path / "p4.pth")).patch == (4, PATCH)
    assert tok.patch_embed.weight.shape == (D, PATCH * PATCH * 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"width": 64, "heads": 1},
            r"width 128, depth 2, 2 heads, MLP 512; the tokenizer's encoder is width 64",
        ),
        ({"enc_depth": 3}, r"depth 2, 2 heads.*encoder is width 128, depth 3"),
        ({"heads": 4}, r"2 heads, MLP 512; the tokenizer's encoder is width 128, depth 2, 4 heads"),
        ({"layer_scale": None}, r"set tokenizer\.layer_scale=1\.0e-5"),
        ({"norm_eps": 1e-5, "cls_token": False}, r"tokenizer\.cls_token=true, tokenizer\.norm_eps=1\.0e-6"),
    ],
)
def test_another_vit_is_refused_naming_both_shapes(tmp_path, change, message):
    cfg = TokenizerConfig(**(vars(CFG) | change))
    with pytest.raises(ValueError, match=message) as err:
        init_encoder(Tokenizer(cfg), save(dinov2_state(), tmp_path / "dinov2.pth"))
    assert "model.init_args.encoder_init=" in str(err.value)


@pytest.mark.parametrize("case", ["missing", "unreadable"])
def test_missing_or_unreadable_file_fails_at_construction_with_the_fix(tmp_path, case):
    path = tmp_path / "weights" / "dinov2_vitb14_pretrain.pth"
    if case == "unreadable":
        path.parent.mkdir()
        path.write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(ValueError) as err:
        LitTokenizer(tokenizer=CFG, merge=MERGE, encoder_init=str(path))
    msg = str(err.value)
    assert f"model.init_args.encoder_init={path}" in msg and re.search("DINOv2/timm key layout", msg)
    assert "model.init_args.encoder_init=null" in msg  # how to turn it off
    assert ("no such file" in msg) == (case == "missing")


def test_the_option_is_not_a_hyper_parameter(tmp_path):
    model = LitTokenizer(
        tokenizer=CFG, merge=MERGE, encoder_init=save(dinov2_state(), tmp_path / "dinov2.pth")
    )
    assert "encoder_init" not in model.hparams  # a checkpoint of the run loads without the file
    sd = dinov2_state()
    assert torch.equal(model.tokenizer.encoder.blocks[1].ls2.gamma, sd["blocks.1.ls2.gamma"])
