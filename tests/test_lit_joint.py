"""Stage 3 (LitJoint): gradient routing of the three losses, the frozen pattern contract, the latent
statistics, the pluggable alignment encoder, and fit / resume / export round trips on the tiny stages."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, budget_overrides
from vlt import load as vlt_load
from vlt.cli import main as vlt
from vlt.lit import LitJoint
from vlt.models.dit import DiTConfig
from vlt.models.tokenizer import TokenizerConfig
from vlt.specs import AlignEncoderSpec, JointSpec, MergeSpec, PartLR
from vlt.types import ImageBatch

TOK = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)
DIT = DiTConfig(width=32, depth=2, heads=2, class_dropout=0.1)


def _joint(**kwargs) -> LitJoint:
    """A random tiny system whose DiT is off its zero init (adaLN-Zero closes every branch, which
    would hide parameters from the gradients)."""
    torch.manual_seed(0)
    model = LitJoint(
        tokenizer=TOK, merge=MergeSpec(grid=[4, 8, 16, 32]), dit=DIT, ks=[4, 8, 16, 32],
        joint=JointSpec(projector_hidden=32), **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.generator.dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.target.copy_from(model.generator.tokenizer.net) if hasattr(model.target, "copy_from") else None
    return model.train()


def _tok(model: LitJoint) -> nn.Module:
    return model.generator.tokenizer.net


def _batch(b: int = 4) -> ImageBatch:
    image, label = torch.rand(b, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, -1, 3][:b])
    return ImageBatch(
        image=image, label=label, complexity=torch.zeros(b, dtype=torch.long), key=list("abcd"[:b])
    )


def _grads(module: nn.Module) -> dict[str, float]:
    return {
        n: (0.0 if p.grad is None else p.grad.abs().sum().item())
        for n, p in module.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("k", [4, 32])
def test_diffusion_loss_gives_no_gradient_to_the_tokenizer(k):
    model = _joint()
    model.losses(_batch(), k, recon_k=8)["diffusion"].backward()
    assert all(g == 0.0 for g in _grads(_tok(model)).values())
    assert sum(_grads(model.generator.dit).values()) > 0


def test_alignment_reaches_the_tokenizer_only_through_the_frozen_dit_pass():
    model = _joint()
    parts = model.losses(_batch(), 8, recon_k=8)
    parts["align_tok"].backward(retain_graph=True)
    encoder = ("patch_embed", "enc_pos", "slots", "encoder", "bottleneck")
    grads = _grads(_tok(model))
    assert all(g > 0 for n, g in grads.items() if n.startswith(encoder)), grads
    assert all(g == 0.0 for n, g in grads.items() if not n.startswith(encoder)), grads  # decoder side
    assert all(g == 0.0 for g in _grads(model.generator.dit).values())
    assert all(g == 0.0 for g in _grads(model.projector).values())
    model.zero_grad(set_to_none=True)
    parts["align_dit"].backward()
    assert all(g == 0.0 for g in _grads(_tok(model)).values())
    assert sum(_grads(model.projector).values()) > 0 and sum(_grads(model.generator.dit).values()) > 0
    # The DiT parameters are trainable again after the frozen pass.
    params = [*model.generator.dit.parameters(), *model.projector.parameters()]
    assert all(p.requires_grad for p in params)


def test_every_trainable_parameter_gets_a_gradient_and_frozen_parts_none():
    model = _joint()
    model.losses(_batch(), 16, recon_k=4)["loss"].backward()
    missing = [n for n, g in _grads(model).items() if g == 0.0]
    assert not missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("target.") for n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert not model.target.training


def test_the_merge_pattern_is_one_frozen_object_shared_by_both_stages():
    model = _joint()
    gen = model.generator
    assert gen.tokenizer.pattern is gen.pattern  # one representation, not two kept in step
    before = {k: gen.pattern.assignment(k).clone() for k in gen.ks}
    for _ in range(2):
        model.losses(_batch(), 8, recon_k=4)["loss"].backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
    assert all(torch.equal(before[k], gen.pattern.assignment(k)) for k in before)


def test_running_statistics_follow_the_batch_with_momentum():
    model = _joint()
    z = torch.randn(4, 32, 16) * 3 + 2
    gen = model.generator
    old_mean, old_var = gen.latent_mean.clone(), gen.latent_std.square()
    out = model.normalise(z)  # training: batch statistics
    torch.testing.assert_close(out.mean((0, 1)), torch.zeros(16), atol=1e-5, rtol=0)
    m = model.spec.bn_momentum
    torch.testing.assert_close(gen.latent_mean, (1 - m) * old_mean + m * z.mean((0, 1)))
    torch.testing.assert_close(gen.latent_std.square(), (1 - m) * old_var + m * z.var((0, 1)))
    model.eval()
    torch.testing.assert_close(model.normalise(z), (z - gen.latent_mean) / gen.latent_std)


def test_optimizer_groups_carry_the_part_learning_rates():
    model = _joint(part_lr=PartLR(tokenizer=1e-5, dit=None, projector=1e-2))

    lrs = {id(p): g["lr"] for g in model.param_groups() for p in g["params"]}
    assert lrs[id(_tok(model).patch_embed.weight)] == 1e-5
    assert lrs[id(model.generator.dit.x_embed.weight)] == model.hparams.optim.lr
    assert lrs[id(model.projector.net[0].weight)] == 1e-2
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())


def test_a_zero_part_learning_rate_freezes_that_part():
    """0 is a learning rate, not "unset": the tokenizer stays where it is while the DiT trains."""
    model = _joint(part_lr=PartLR(tokenizer=0.0))
    optimizer = torch.optim.AdamW(model.param_groups())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.losses(_batch(), 8, recon_k=8)["loss"].backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(("generator.dit.", "projector.")) for n in moved)


class _TinyEncoder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 8, stride=8)  # (B, 12, 4, 4) at 32x32


def test_file_encoder_is_frozen_adapted_and_never_saved(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(_TinyEncoder()), str(path))
    model = _joint(align_encoder=AlignEncoderSpec(kind="file", path=str(path), image_size=32))
    assert model.target.width == 12
    feats = model.target(_batch().image)
    assert feats.shape == (4, 32, 12) and not feats.requires_grad
    assert not any(key.startswith("target.") for key in model.state_dict())
    model.losses(_batch(), 8, recon_k=8)["align_tok"].backward()
    assert _grads(_tok(model))["patch_embed.weight"] > 0
    with pytest.raises(
        ValueError, match=r"missing\.pt does not exist \(model\.init_args\.align_encoder\.path"
    ):
        _joint(align_encoder=AlignEncoderSpec(kind="file", path=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match=r"align_encoder\.kind"):
        _joint(align_encoder=AlignEncoderSpec(kind="dino"))  # type: ignore[arg-type]


def test_stage1_encoder_is_a_frozen_copy():
    model = _joint()
    sd = model.state_dict()
    assert torch.equal(sd["target.net.slots"], sd["generator.tokenizer.net.slots"])
    assert not any(p.requires_grad for p in model.target.parameters())
    model.train()
    assert not model.target.training


# --- on the tiny trained stage checkpoints (session fixtures) ---
TINY_JOINT = [
    "--model.init_args.joint.projector_hidden=32",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.batches_per_epoch=2",
    "--data.init_args.batch_size=8",
    "--data.init_args.val_batch_size=32",
    "--data.init_args.num_workers=0",
]


@pytest.mark.slow
def test_fit_resume_export_and_sample(tmp_path, tiny_shards, tiny_tokenizer, tiny_dit, tiny_vltnet):
    # Copies of the init checkpoints, deleted before reloading: a joint checkpoint needs neither.
    tok_init, dit_init = tmp_path / "tok.ckpt", tmp_path / "dit.ckpt"
    shutil.copy(tiny_tokenizer, tok_init)
    shutil.copy(tiny_dit, dit_init)
    runs = tiny_tokenizer.parents[2]  # shares the session's cached real FID statistics
    args = [
        "fit", "-c", str(ROOT / "conf/joint/tiny.yaml"), f"--runs_dir={runs}", "--name=joint",
        f"--model.init_args.init_from_tokenizer={tok_init}", f"--model.init_args.init_from_dit={dit_init}",
        f"--data.init_args.train={tiny_shards['train']}", f"--data.init_args.val={tiny_shards['val']}",
        *TINY_JOINT, *budget_overrides(tiny_vltnet, tiny_shards["val"]),
    ]  # fmt: skip
    vlt(args)
    run = runs / "joint"
    curve = (run / "curves" / "budget.csv").read_text().splitlines()
    assert "gfid_proxy" in curve[0] and "rfid_proxy" in curve[0] and "psnr" in curve[0]
    assert "gfd_vltnet_ci" in curve[0] and "rclass_acc_vltnet" in curve[0]
    assert {row.split(",")[0] for row in curve[1:]} >= {"0", "4"}  # before (at_fit_start) and after
    vlt([*args, "--trainer.max_steps=6", "--ckpt_path=last"])  # resume
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["vlt_stage"] == "joint"
    assert any(key.startswith("target.") for key in ckpt["state_dict"])  # the frozen stage-1 copy
    tok_init.unlink()
    dit_init.unlink()
    final = LitJoint.load_from_checkpoint(last, map_location="cpu")  # without the init files
    for key, value in final.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][key]), key
    gen = vlt_load(str(last))  # the stage object of a joint checkpoint: a generator
    torch.testing.assert_close(gen.latent_std, final.generator.latent_std)

    export = run / "export"
    exported, tok = vlt_load(str(export / "generator")), vlt_load(str(export / "tokenizer"))
    assert exported.pattern.equal(tok.pattern) and exported.ks == final.ks
    assert not any("target" in key for key in exported.state_dict())
    torch.testing.assert_close(exported.latent_std, final.generator.latent_std)
    torch.testing.assert_close(tok.net.patch_embed.weight, final.generator.tokenizer.net.patch_embed.weight)

    from vlt.tools.sample import sample

    written = sample(dit=str(export / "generator"), k=[4, 32], count=2, steps=2, out=str(tmp_path / "s"))
    assert all(p.is_file() for p in written) and len(written) == 4
