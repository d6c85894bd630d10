"""Per-K LoRA: adapters chosen by sequence length, zero B = the base, on/off changes only the adapted
layers, stage-2 training touches only the adapters of its K, and the reference's PEFT layout converts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, TINY_DIT
from tests.test_reference import (
    LORA_TARGETS,
    C,
    N,
    inputs,
    random_state,
    reference_dit_shapes,
    reference_forward,
    uneven_pattern,
)
from vlt.cli import main as vlt
from vlt.models.dit import DiT, DiTConfig
from vlt.nn.lora import LoRALinear, add_lora, lora_parameters
from vlt.specs import LoRASpec
from vlt.stages import export, load
from vlt.stages.reference import dit_from_reference, split_peft

SMALL = {"n_slots": N, "channels": C, "width": 32, "depth": 2, "heads": 2, "num_classes": 10}


def opened(dit: DiT, seed: int = 0) -> DiT:
    """Random non-adapter weights (adaLN gates open) so every layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".adapters." not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return dit


def test_lora_linear_picks_its_adapter_by_length():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = add_lora_to(base, ks=[4])
    x4, x3 = torch.randn(2, 4, 6), torch.randn(2, 3, 6)
    assert torch.equal(layer(x4), base(x4))  # B = 0 at start: the base exactly
    with torch.no_grad():
        layer.adapters["4"].b.normal_()
    assert not torch.allclose(layer(x4), base(x4))
    assert torch.equal(layer(x3), base(x3))  # no adapter for length 3: the base
    a, b = layer.adapters["4"].a, layer.adapters["4"].b
    torch.testing.assert_close(layer(x4), base(x4) + x4 @ a.T @ b.T * layer.adapters["4"].scale)


def add_lora_to(linear: nn.Linear, ks) -> LoRALinear:
    holder = nn.Module()
    holder.proj = linear
    assert add_lora(holder, ["proj"], ks, rank=2, alpha=4.0) == 1
    assert holder.proj.weight is linear.weight  # shares the base tensors
    return holder.proj


def test_zero_adapters_equal_the_base_and_keep_its_keys():
    base = opened(DiT(DiTConfig(**SMALL)))
    adapted = DiT(DiTConfig(**SMALL, lora_ks=[5], lora_rank=4, lora_alpha=4.0))
    missing = adapted.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(".adapters.5." in key for key in missing)  # only the adapters are new
    assert len(missing) == 2 * 4 * SMALL["depth"]  # a and b of four linears per block
    pattern = uneven_pattern()
    for k in (5, N):
        x, t, y = inputs(k)
        args = (x, t, y, pattern.gbar(k), pattern.sizes(k))
        assert torch.equal(adapted.eval()(*args), base.eval()(*args))


def block_outputs(dit: DiT, args) -> list[torch.Tensor]:
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in dit.blocks]
    final = dit(*args)
    for h in hooks:
        h.remove()
    return [*outs, final]


def test_an_adapter_changes_only_its_layer_and_its_k():
    dit = opened(DiT(DiTConfig(**SMALL, lora_ks=[5], lora_rank=4, lora_alpha=4.0))).eval()
    pattern = uneven_pattern()
    at = {k: (*inputs(k), pattern.gbar(k), pattern.sizes(k)) for k in (5, N)}
    before = {k: block_outputs(dit, args) for k, args in at.items()}
    with torch.no_grad():
        dit.blocks[1].mlp.w3.adapters["5"].b.normal_()  # one adapter of the last block, K=5
    after = {k: block_outputs(dit, args) for k, args in at.items()}
    assert torch.equal(after[5][0], before[5][0])  # block 0 untouched
    assert not torch.allclose(after[5][1], before[5][1])  # block 1 (the adapted layer) moves
    assert not torch.allclose(after[5][2], before[5][2])  # and so does the velocity
    assert all(torch.equal(a, b) for a, b in zip(after[N], before[N], strict=True))  # K=N: the base


def peft_state(sd: dict, name: str = "256", rank: int = 4, seed: int = 3) -> tuple[dict, dict]:
    """The reference's LoRA checkpoint layout (PEFT `get_peft_model(model, cfg, adapter_name='256')`)
    and the adapter pairs (A, B) by reference layer name."""
    g = torch.Generator().manual_seed(seed)
    peft, pairs = {}, {}
    for key, value in sd.items():
        layer = key.rsplit(".", 1)[0]
        if layer.startswith("transformer.blocks.") and layer.split(".", 3)[3] in LORA_TARGETS:
            peft[f"base_model.model.{layer}.base_layer.{key.rsplit('.', 1)[1]}"] = value
            if key.endswith(".weight"):
                a = torch.randn(rank, value.shape[1], generator=g) * 0.1
                b = torch.randn(value.shape[0], rank, generator=g) * 0.1
                peft[f"base_model.model.{layer}.lora_A.{name}.weight"] = a
                peft[f"base_model.model.{layer}.lora_B.{name}.weight"] = b
                pairs[layer] = (a, b)
        else:
            peft[f"base_model.model.{key}"] = value
    return peft, pairs


def test_reference_lora_converts_and_matches_the_reference_forward():
    sd = random_state(reference_dit_shapes())
    peft, pairs = peft_state(sd)
    base, adapters = split_peft(peft, k=5)
    assert base.keys() == sd.keys()
    dit = dit_from_reference(base, lora={5: adapters}).eval()  # strict load
    assert dit.cfg.lora_ks == [5] and dit.cfg.lora_rank == 4 and dit.cfg.lora_alpha == 4.0
    pattern = uneven_pattern()
    x, t, y = inputs(5)
    expected = reference_forward(sd, x, t, y, pattern.gbar(5), pattern.sizes(5), lora=pairs)
    ours = dit(x, t, y, pattern.gbar(5), pattern.sizes(5))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, reference_forward(sd, x, t, y, pattern.gbar(5), pattern.sizes(5)))
    x, t, y = inputs(N)  # no adapter at K=N: the reference base network
    plain = reference_forward(sd, x, t, y, pattern.gbar(N), pattern.sizes(N))
    torch.testing.assert_close(dit(x, t, y, pattern.gbar(N), pattern.sizes(N)), plain, atol=1e-5, rtol=1e-4)


# --- stage 2: the config switch trains only the adapters of its K ---
def test_lora_fit_trains_only_the_adapters_of_its_k(tmp_path, tiny_latents, tiny_tokenizer):
    from vlt.lit import LitDiT

    dit = {"n_slots": 32, "channels": 32, "width": 32, "depth": 1, "heads": 2, "num_classes": 10}
    base_model = LitDiT.from_cache(str(tiny_latents), tokenizer=str(tiny_tokenizer), dit=DiTConfig(**dit))
    opened(base_model.generator.dit)
    base = export(base_model.generator, tmp_path / "base")
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/dit/tiny-lora.yaml"),
            f"--runs_dir={tmp_path}",
            "--name=lora",
            f"--latents={tiny_latents}",
            f"--model.init_args.tokenizer={tiny_tokenizer}",
            f"--model.init_args.lora.base={base}",
            *TINY_DIT,
        ]
    )
    trained = load(tmp_path / "lora" / "checkpoints" / "last.ckpt")
    assert trained.dit.cfg.lora_ks == [8]
    before = load(base).dit.state_dict()
    after = trained.dit.state_dict()
    adapters = {name for name, _ in lora_parameters(trained.dit, 8)}
    assert set(after) - set(before) == adapters
    # The checkpoint holds EMA weights: decay * w + (1 - decay) * w rounds a frozen weight by <= 1 ulp.
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, atol=1e-6, rtol=0, msg=f"{name} changed")
    assert any(after[n].abs().sum() > 0 for n in adapters if n.endswith(".b"))  # B moved off zero


def test_lora_spec_freezes_all_but_the_adapters_of_its_k():
    from vlt.lit import LitDiT

    model = LitDiT(dit=DiTConfig(n_slots=32, lora_ks=[16], lora_rank=8, lora_alpha=8.0), ks=[8, 16, 32],
                   lora=LoRASpec(k=8, rank=8, alpha=8.0))  # fmt: skip
    dit = model.generator.dit
    assert dit.cfg.lora_ks == [8, 16] and model.k_cycle == [8]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"generator.dit.{name}" for name, _ in lora_parameters(dit, 8)}
    optimised = {id(p) for group in model.optimizer_groups() for p in group["params"]}
    assert optimised == {id(p) for _, p in lora_parameters(dit, 8)}


def test_lora_spec_checks_its_k():
    from vlt.lit import LitDiT

    with pytest.raises(ValueError, match=r"lora\.k=3"):
        LitDiT(dit=DiTConfig(n_slots=32), ks=[8, 32], lora=LoRASpec(k=3))
    with pytest.raises(ValueError, match="k_source='cycle'"):
        LitDiT(dit=DiTConfig(n_slots=32, k_conditioning=True), ks=[8, 32], prior_grid=[8], k_source="data",
               lora=LoRASpec(k=8))  # fmt: skip
