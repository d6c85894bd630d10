"""The stage-1 GAN terms: hinge and LeCam values by hand, a frozen DINO backbone under trainable heads,
gradient isolation, a discriminator that learns a toy problem, start-up errors for a missing backbone
file, and LitTokenizer training with the terms on (and unchanged before `disc_start`)."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tests.conftest import ROOT, TINY_TOKENIZER
from vlt.cli import main as vlt
from vlt.lit import LitTokenizer
from vlt.models.dino import DinoViT
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.adversarial import (
    AdversarialLoss,
    LeCam,
    SNConv1d,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    read_layers,
)
from vlt.specs import LossSpec, MergeSpec, OptimSpec
from vlt.types import ImageBatch

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])
TINY = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)


def write_backbone(path, seed: int = 0, **kwargs) -> str:
    """A random tiny DINO-layout backbone file (width 32, depth 2, patch 8 at 32x32)."""
    torch.manual_seed(seed)
    DinoViT(**({"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 32} | kwargs)).save(path)
    return str(path)


def adversarial(path, **kwargs) -> AdversarialLoss:
    return AdversarialLoss(
        **({"weight": 0.5, "backbone_path": path, "size": "tiny", "image_size": 32} | kwargs)
    )


# --- losses by hand ---
def test_hinge_losses_match_hand_values():
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6), relu(1 + fake) = [0, 1, 2.5] (mean 7/6)
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    assert hinge_g_loss(FAKE).item() == pytest.approx(1 / 6)  # -mean([-2, 0, 1.5])


def test_lecam_matches_hand_values_and_keeps_its_ema_as_state():
    lecam = LeCam(decay=0.9)
    # EMAs from 0 after one update: real 0.1 * 0.5 = 0.05, fake 0.1 * (-1/6) = -1/60
    expected = ((2 + 1 / 60) ** 2 + (0.5 + 1 / 60) ** 2) / 3 + (2.05**2 + 0.05**2) / 3
    assert lecam(REAL, FAKE).item() == pytest.approx(expected)
    assert lecam.ema_real.item() == pytest.approx(0.05) and lecam.ema_fake.item() == pytest.approx(-1 / 60)
    lecam(REAL, FAKE)
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.05 + 0.1 * 0.5)
    restored = LeCam(decay=0.9)
    restored.load_state_dict(lecam.state_dict())  # buffers: they checkpoint and resume
    assert restored.ema_real.item() == lecam.ema_real.item() and restored.ema_fake.item() != 0
    lecam.eval()
    before = lecam.ema_real.clone()
    lecam(REAL + 5, FAKE)
    assert torch.equal(lecam.ema_real, before)  # no update outside training


def test_spectral_norm_divides_by_the_largest_singular_value_and_keeps_u_as_state():
    conv = SNConv1d(6, 4, 3)
    # Power iteration converges as (s2 / s1)^(2n): a random init's top two singular values can lie close
    # enough that 30 iterations miss 1e-4, so the weight gets a known gap (singular values 2, 1, 0.5, 0.25).
    g = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    right, _ = torch.linalg.qr(torch.randn(18, 4, generator=g))
    with torch.no_grad():
        conv.weight.copy_((left @ torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.25])) @ right.T).view(4, 6, 3))
    for _ in range(30):  # power iterations, one per training forward
        conv(torch.randn(2, 6, 5))
    exact = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert conv.sigma().item() == pytest.approx(exact.item(), rel=1e-4)
    x = torch.randn(2, 6, 5)
    plain = F.conv1d(F.pad(x, (1, 1), mode="circular"), conv.weight / exact, conv.bias)
    torch.testing.assert_close(conv.eval()(x), plain, atol=1e-5, rtol=1e-4)
    copy = SNConv1d(6, 4, 3)
    copy.load_state_dict(conv.state_dict())
    assert torch.equal(copy.u, conv.u) and not list(conv.named_buffers())


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    weight = adaptive_weight((w * a).sum(), (w * b).sum(), w)  # gradients a and b: norms 5 and 1
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4)) and not weight.requires_grad


def test_read_layers_are_the_embedding_and_four_evenly_spaced_blocks():
    assert read_layers(12) == (-1, 2, 5, 8, 11)
    assert read_layers(2) == (-1, 0, 1)


# --- the discriminator ---
def test_backbone_is_frozen_outside_the_state_and_heads_train(tmp_path):
    adv = adversarial(write_backbone(tmp_path / "b.pt"), lecam=0.1)
    backbone = adv.disc.backbone
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert not any(p.requires_grad for p in backbone.parameters())
    names = set(adv.state_dict())
    assert not any("pos_embed" in n or "blocks" in n for n in names)  # never in a checkpoint
    assert {"lecam._extra_state", "disc.heads.0.out._extra_state"} <= names  # LeCam EMA, SN vector u
    assert not list(adv.named_buffers())  # DDP would broadcast buffers at every forward, validation included
    assert {id(p) for p in adv.parameters()}.isdisjoint(id(p) for p in backbone.parameters())
    opt = torch.optim.AdamW(adv.parameters(), lr=1e-2)
    x, conv = torch.rand(4, 3, 32, 32) * 2 - 1, torch.nn.Conv2d(3, 3, 3, padding=1)
    for _ in range(3):
        x_hat = conv(x)
        out = adv(x, x_hat, F.mse_loss(x_hat, x), step=0, last_layer=None)
        opt.zero_grad()
        (out["adv_g"] + out["disc_loss"]).backward()
        assert all(p.grad is None for p in backbone.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adv.parameters())
        opt.step()
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in frozen.items())


def test_generator_and_discriminator_terms_never_share_a_gradient(tmp_path):
    adv = adversarial(write_backbone(tmp_path / "b.pt"), adaptive=True)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x_hat = conv(x)
    out = adv(x, x_hat, F.mse_loss(x_hat, x), step=0, last_layer=conv.weight)
    heads, tok = list(adv.parameters()), [conv.weight]
    g_heads = torch.autograd.grad(out["adv_g"], heads, retain_graph=True, allow_unused=True)
    d_tok = torch.autograd.grad(out["disc_loss"], tok, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_heads) and all(g is None for g in d_tok)
    assert torch.autograd.grad(out["adv_g"], tok, retain_graph=True)[0].abs().sum() > 0
    assert out["adv_weight"].item() > 0 and out["adv_weight"].item() != pytest.approx(0.5)  # adaptive


def test_before_the_start_both_terms_are_zero(tmp_path):
    adv = adversarial(write_backbone(tmp_path / "b.pt"), start=5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = adv(x, x.clone().requires_grad_(True), torch.tensor(1.0), step=4, last_layer=None)
    assert set(out) == {"adv_g", "adv_weight", "disc_loss"}
    assert out["adv_g"].item() == 0 and out["disc_loss"].item() == 0
    out["disc_loss"].backward()  # every head stays in the graph, with zero gradient
    assert all(p.grad is not None and not p.grad.any() for p in adv.parameters())
    assert "disc_real" in adv(x, x.clone(), torch.tensor(1.0), step=5, last_layer=None)


def _smooth(n: int) -> torch.Tensor:
    """Images of random linear colour ramps (the toy 'reals')."""
    coords = torch.linspace(-1, 1, 32)
    ramp = coords[None, None, :, None] * torch.rand(n, 3, 1, 1) + coords[None, None, None, :] * torch.rand(
        n, 3, 1, 1
    )
    return ramp.clamp(-1, 1)


def test_discriminator_learns_to_tell_reals_from_noise(tmp_path):
    """30 hinge steps on smooth 'reals' against noise 'fakes': on held-out images the loss falls, its
    real part most, and reals score above fakes (the heads are spectral-normalised: logits grow slowly)."""
    adv = adversarial(write_backbone(tmp_path / "b.pt"))
    opt = torch.optim.Adam(adv.parameters(), lr=1e-2)
    torch.manual_seed(1)

    def d_terms(real, fake):
        r, f = adv.disc(real), adv.disc(fake)
        return hinge_d_loss(r, f), F.relu(1 - r).mean(), r.mean() - f.mean()

    test_real, test_fake = _smooth(16), torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        loss0, real0, gap0 = d_terms(test_real, test_fake)
    for _ in range(30):
        loss, _, _ = d_terms(_smooth(8), torch.rand(8, 3, 32, 32) * 2 - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss1, real1, gap1 = d_terms(test_real, test_fake)
    assert loss1 < 0.85 * loss0 and real1 < 0.6 * real0
    assert gap1 > 0.2 and gap1 > 10 * gap0.abs()


# --- the backbone file ---
def test_backbone_files_load_by_layout_with_registers_layer_scale_and_another_grid(tmp_path):
    path = write_backbone(tmp_path / "v2.pt", image_size=64, registers=4, layer_scale=True)
    state = torch.load(path, weights_only=True) | {
        "norm.weight": torch.ones(32),
        "mask_token": torch.zeros(1, 32),
    }
    torch.save(state, path)  # a released DINOv2 file also has these
    net = DinoViT.from_file(path, size="tiny", image_size=32)
    assert net.grid == 4 and net.pos_embed.shape == (1, 17, 32) and net.register_tokens.shape == (1, 4, 32)
    assert torch.equal(net.blocks[1].ls2.gamma, state["blocks.1.ls2.gamma"])
    feats = net(torch.rand(2, 3, 48, 48) * 2 - 1, (-1, 1))  # resized to 32: 16 patches
    assert [f.shape for f in feats] == [(2, 32, 16), (2, 32, 16)]
    with pytest.raises(ValueError, match=r"width 32 and depth 2.*size 's' is width 384, depth 12"):
        DinoViT.from_file(path, size="s")


@pytest.mark.parametrize("case", ["none", "missing", "unreadable", "wrong_size"])
def test_missing_or_unusable_backbone_fails_at_construction_with_the_fix(tmp_path, case):
    path = {"none": None, "missing": str(tmp_path / "nowhere" / "dino.pt")}.get(case, str(tmp_path / "d.pt"))
    if case == "unreadable":
        (tmp_path / "d.pt").write_bytes(b"not a torch file")
    if case == "wrong_size":
        write_backbone(tmp_path / "d.pt")
    loss = LossSpec(adversarial=0.5, disc_weights=path, disc_size="s" if case == "wrong_size" else "tiny")
    with pytest.raises(ValueError) as err:
        LitTokenizer(tokenizer=TINY, loss=loss)
    msg = str(err.value)
    assert "model.init_args.loss.disc_weights" in msg and "model.init_args.loss.adversarial=0" in msg
    assert "DinoViT" in msg and "state_dict" in msg
    assert (path is None and "no file was given" in msg) or re.search(re.escape(str(path)), msg)


def test_cli_refuses_a_missing_backbone_before_reading_data(tmp_path):
    missing = tmp_path / "weights" / "dino_vits16.pt"
    with pytest.raises(ValueError, match=re.escape(f"{missing} does not exist")):
        vlt(
            [
                "fit", "-c", str(ROOT / "conf/tokenizer/tiny.yaml"), f"--runs_dir={tmp_path}",
                "--data.init_args.train=/no/such/shards-*.tar", "--data.init_args.val=/no/such/val-*.tar",
                "--model.init_args.loss.adversarial=0.5", f"--model.init_args.loss.disc_weights={missing}",
            ]
        )  # fmt: skip


# --- LitTokenizer ---
def _loader(n: int = 24) -> DataLoader:
    torch.manual_seed(123)
    images = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(n)]

    def collate(xs):
        b = len(xs)
        return ImageBatch(
            torch.stack(xs), torch.full((b,), -1), torch.full((b,), -1), [str(i) for i in range(b)]
        )

    return DataLoader(images, batch_size=8, collate_fn=collate)


def _fit(model: LitTokenizer, tmp_path, steps: int = 3) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, _loader())
    return trainer


def _model(loss: LossSpec = LossSpec(kl=0.0)) -> LitTokenizer:  # noqa: B008
    torch.manual_seed(0)
    merge = MergeSpec(grid=[4, 8, 16], embed_dim=8, full_k_fraction=0.0)
    return LitTokenizer(tokenizer=TINY, merge=merge, loss=loss, optim=OptimSpec(warmup_steps=1))


def test_before_disc_start_training_is_exactly_the_reconstruction_training(tmp_path):
    off = _model()
    on = _model(LossSpec(kl=0.0, adversarial=0.5, disc_weights=write_backbone(tmp_path / "b.pt"),
                         disc_size="tiny", disc_image_size=32, disc_start=100, lecam=0.01))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(off.tokenizer.parameters(), on.tokenizer.parameters()))
    fits = [_fit(model, tmp_path) for model in (off, on)]
    assert fits[0].logged_metrics["train/loss"] == fits[1].logged_metrics["train/loss"]
    assert fits[1].logged_metrics["train/disc_loss"] == 0
    for a, b in zip(off.state_dict().items(), on.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]  # tokenizer and merger, bit for bit
    assert not hasattr(off, "adversarial") or off.adversarial is None
    assert not any(k.startswith("adversarial.") for k in off.state_dict())


def test_adversarial_training_updates_both_networks_and_logs_the_terms(tmp_path):
    loss = LossSpec(kl=0.0, adversarial=0.5, disc_weights=write_backbone(tmp_path / "b.pt"), disc_size="tiny",
                    disc_image_size=32, disc_start=1, lecam=0.01, disc_adaptive=True)  # fmt: skip
    model = _model(loss)
    heads = {k: v.clone() for k, v in model.adversarial.state_dict().items()}
    trainer = _fit(model, tmp_path)
    logged = trainer.logged_metrics
    assert trainer.global_step == 3  # one step per batch: the discriminator adds none
    assert {
        "train/adv_g",
        "train/adv_weight",
        "train/disc_real",
        "train/disc_fake",
        "train/disc_lecam",
    } <= set(logged)
    assert logged["train/loss"] == pytest.approx(float(logged["train/l2"] + logged["train/align"] * 0.25
                                                       + logged["train/adv_g"]), rel=1e-5)  # fmt: skip
    changed = [k for k, v in model.adversarial.state_dict().items() if not torch.equal(v, heads[k])]
    assert any("heads.0.out" in k for k in changed) and model.adversarial.lecam.ema_real != 0


@pytest.mark.slow
def test_vlt_fit_with_the_discriminator_checkpoints_and_resumes(tmp_path, tiny_shards):
    disc = write_backbone(tmp_path / "dino.pt")
    args = [
        "fit", "-c", str(ROOT / "conf/tokenizer/tiny.yaml"), f"--runs_dir={tmp_path}", "--name=gan",
        f"--data.init_args.train={tiny_shards['train']}", f"--data.init_args.val={tiny_shards['val']}",
        *TINY_TOKENIZER, "--model.init_args.loss.adversarial=0.5",
        f"--model.init_args.loss.disc_weights={disc}",
        "--model.init_args.loss.disc_size=tiny", "--model.init_args.loss.disc_image_size=32",
        "--model.init_args.loss.disc_start=2", "--model.init_args.loss.lecam=0.001",
        "--model.init_args.loss.disc_adaptive=true", "--trainer.max_steps=4",
    ]  # fmt: skip
    vlt(args)
    last = tmp_path / "gan" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    current = first["current_model_state"]  # EMA on: the training weights beside the average
    assert first["global_step"] == 4 and current["adversarial.lecam._extra_state"].abs().min() > 0
    trainable = [p for p in LitTokenizer.load_from_checkpoint(last).parameters() if p.requires_grad]
    assert len(first["optimizer_states"][0]["state"]) == len(trainable)  # the heads' AdamW state too
    vlt([*args, "--trainer.max_steps=6", "--ckpt_path=last"])
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6
    later = resumed["current_model_state"]
    ema = "adversarial.lecam._extra_state"
    assert not torch.equal(later[ema], current[ema])
    model = LitTokenizer.load_from_checkpoint(last)
    assert torch.equal(model.adversarial.lecam.ema, resumed["state_dict"][ema])
    from vlt import load as vlt_load

    assert vlt_load(str(last)).reconstruct(torch.zeros(1, 3, 32, 32), 8).shape == (1, 3, 32, 32)
