"""The 1D tokenizer, its bottlenecks and the reconstruction objective."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vlt.models import Merger, Tokenizer, TokenizerConfig
from vlt.objectives.recon import PerceptualNet, ReconLoss, psnr

SMALL = {"width": 32, "enc_depth": 1, "dec_depth": 1, "n_slots": 16, "channels": 8}


def test_shapes_and_layernorm_latents() -> None:
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**SMALL))
    x = torch.randn(2, 3, 32, 32)
    enc = tok.encode(x)
    assert enc.z.shape == (2, 16, 8) and enc.kl == 0
    torch.testing.assert_close(enc.z.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    assert tok.decode(enc.z).shape == x.shape


def test_kl_bottleneck_samples_only_in_training() -> None:
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**SMALL, bottleneck="kl", init="paper"))
    x = torch.randn(2, 3, 32, 32)
    tok.train()
    a, b = tok.encode(x), tok.encode(x)
    assert not torch.equal(a.z, b.z) and a.kl > 0
    tok.eval()
    assert torch.equal(tok.encode(x).z, tok.encode(x).z)
    no_sample = Tokenizer(TokenizerConfig(**SMALL, bottleneck="kl", kl_sample=False)).train()
    assert torch.equal(no_sample.encode(x).z, no_sample.encode(x).z)


def test_init_modes_set_embedding_scales() -> None:
    torch.manual_seed(0)
    tiny = Tokenizer(TokenizerConfig(width=64, n_slots=64))
    assert 0.9 < tiny.slots.std() < 1.1 and 0.9 < tiny.dec_pos.std() < 1.1
    assert 0.25 < tiny.enc_pos.std() < 0.35 and tiny.mask_token.abs().sum() == 0
    paper = Tokenizer(TokenizerConfig(width=64, n_slots=64, init="paper"))
    assert paper.slots.std() < 0.03 and paper.mask_token.std() < 0.03


@pytest.mark.parametrize(("key", "value"), [("bottleneck", "vq"), ("init", "big"), ("image_size", 30)])
def test_bad_config_raises(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=str(value)):
        TokenizerConfig(**{key: value})


def test_merged_reconstruction_trains_merge_embeddings() -> None:
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**SMALL))
    merger = Merger(mode="lgm", n_slots=16, grid=(2, 4, 8), embed_dim=8)
    loss_fn = ReconLoss()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = tok.encode(x)
    out = merger(enc.z, merger.sample_k(torch.Generator().manual_seed(0)))
    parts = loss_fn(x, tok.decode(out.z_hat), kl=enc.kl, align=merger.alignment_loss(enc.z))
    parts["loss"].backward()
    assert merger.e.grad is not None and merger.e.grad.abs().sum() > 0
    assert all(p.grad is not None for p in tok.parameters())


def test_recon_loss_is_the_weighted_sum_of_its_parts() -> None:
    torch.manual_seed(0)
    x, x_hat = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    parts = ReconLoss(l2=2.0, kl=0.5, align=3.0)(x, x_hat, kl=torch.tensor(4.0), align=torch.tensor(0.1))
    assert set(parts) == {"loss", "l2", "kl", "align", "perceptual"}
    torch.testing.assert_close(parts["l2"], (x - x_hat).pow(2).mean())
    torch.testing.assert_close(parts["loss"], 2.0 * parts["l2"] + 0.5 * 4.0 + 3.0 * 0.1)
    assert parts["perceptual"] == 0


def test_psnr() -> None:
    """One PSNR definition for logs and curves: per image, peak-to-peak 2, clamped, capped at 100 dB."""
    x = torch.rand(3, 3, 8, 8) * 1.6 - 0.8
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((3,), 10 * math.log10(400.0)))
    assert (psnr(x, x) == 100).all()  # identical images are capped, not inf
    assert torch.equal(psnr(x, x + 5), psnr(x, x.new_ones(x.shape)))  # predictions are clamped
    y = x.clone()
    y[1] = (y[1] + 0.2).clamp(-1, 1)
    out = psnr(x, y)
    assert out.shape == (3,) and out[0] == 100.0 and out[2] == 100.0
    torch.testing.assert_close(out[1], 10 * torch.log10(1 / (((x[1] - y[1]) / 2) ** 2).mean()))


@pytest.mark.parametrize("path", [None, "missing/perceptual.pt"])
def test_perceptual_without_weights_names_the_file(path: str | None) -> None:
    key = r"model\.init_args\.loss\.perceptual_weights"
    with pytest.raises(ValueError, match=key if path is None else rf"missing/perceptual\.pt.*{key}"):
        ReconLoss(perceptual=1.0, perceptual_weights=path)


def test_perceptual_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = PerceptualNet()
    with torch.no_grad():
        for lin in net.lins:
            lin.weight.uniform_(0.5, 1.0)
    net.save(tmp_path / "perceptual.pt")
    loss_fn = ReconLoss(perceptual=1.0, perceptual_weights=str(tmp_path / "perceptual.pt"))
    assert loss_fn.state_dict() == {}  # the feature net never lands in checkpoints
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    parts = loss_fn(x, x_hat, kl=torch.tensor(0.0), align=torch.tensor(0.0))
    torch.testing.assert_close(parts["perceptual"], net(x_hat, x).mean())
    assert parts["perceptual"] > 0 and loss_fn.perceptual_distance(x, x).abs().max() < 1e-6
    parts["loss"].backward()
    assert x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn._net[0].parameters())


def test_softvq_reads_one_codebook_per_slot_group_and_regularises_only_in_training() -> None:
    from vlt.models.bottleneck import SoftVQBottleneck

    torch.manual_seed(0)
    vq = SoftVQBottleneck(16, 4, codebooks=2, codebook_size=8, tau=0.07)
    h = torch.randn(3, 6, 16)  # N = 6: slots 0-2 read codebook 0, slots 3-5 codebook 1
    with torch.no_grad():
        vq.codebook[1] = vq.codebook[0].flip(0)
    out = vq.train()(h)
    assert out.z.shape == (3, 6, 4) and out.z.norm(dim=-1).max() <= 1 + 1e-6  # convex mixes of unit vectors
    assert out.kl.ndim == 0 and torch.isfinite(out.kl)
    out.z.sum().backward()
    assert vq.codebook.grad.abs().sum() > 0 and vq.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        vq.codebook[1].copy_(torch.randn(8, 4))  # only the second group's outputs may change
        again = vq.eval()(h)
    torch.testing.assert_close(again.z[:, :3], out.z[:, :3].detach())
    assert not torch.allclose(again.z[:, 3:], out.z[:, 3:]) and again.kl == 0
    with pytest.raises(ValueError, match="codebook groups"):
        vq(torch.randn(1, 5, 16))
