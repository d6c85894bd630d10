"""DiT on merged tokens: shapes for every K, merged positions, proportional attention, adaLN-Zero,
label dropout, analytic FLOPs, and contract tests for every registered preset."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlt.models.dit import DiT, DiTConfig
from vlt.models.merge_ops import merge, unmerge
from vlt.models.pattern import MergePattern
from vlt.models.registry import create, list_presets
from vlt.nn.modulation import LabelEmbedder

N, C, KS = 32, 16, (4, 8, 16, 32)


def small(**kw) -> DiT:
    return DiT(DiTConfig(**{"n_slots": N, "channels": C, "width": 64, "depth": 2, "heads": 4, **kw}))


def perturb(model: DiT, std: float = 0.05) -> DiT:
    """Open the zero-initialised branches so outputs depend on every input."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def random_nested_table(n: int, ks, seed: int = 0) -> MergePattern:
    """Contiguous groups of a random slot order: nested, but scattered over the slot index."""
    rank = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return MergePattern(n, {k: rank * k // n for k in ks})


def uneven_table(seed: int = 0) -> MergePattern:
    """K=8 clusters of sizes 1..6 over scattered slots (unequal sizes make the log m_j bias matter)."""
    rank = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    groups = torch.repeat_interleave(torch.arange(8), torch.tensor([1, 2, 3, 4, 5, 6, 5, 6]))
    return MergePattern(N, {8: groups[rank]})


def inputs(k: int, b: int = 2):
    return torch.randn(b, k, C), torch.rand(b), torch.randint(0, 10, (b,))


@pytest.mark.parametrize("table", [MergePattern.contiguous(N, KS), random_nested_table(N, KS)])
def test_shape_for_every_k(table):
    torch.manual_seed(0)
    model = perturb(small())
    for k in table.ks:
        x, t, y = inputs(k)
        out = model(x, t, y, table.gbar(k), table.sizes(k))
        assert out.shape == (2, k, C)
        assert torch.isfinite(out).all()


def test_positions_identity_and_means():
    torch.manual_seed(0)
    model = small()
    assert torch.allclose(model.positions(torch.eye(N))[0], model.pos)
    table = uneven_table()
    gamma, pt = table.gamma(8), model.positions(table.gbar(8))[0]  # (N, K), (K, D)
    for j in range(8):
        assert torch.allclose(pt[j], model.pos[gamma[:, j] > 0].mean(0), atol=1e-6)


def test_adaln_zero_output_is_zero():
    torch.manual_seed(0)
    model = small()
    table = MergePattern.contiguous(N, [8])
    x, t, y = inputs(8)
    assert torch.equal(model(x, t, y, table.gbar(8), table.sizes(8)), torch.zeros(2, 8, C))


def test_proportional_attention_equals_unmerged_forward():
    """With positions constant inside clusters, the DiT on K merged tokens with log m_j key bias equals
    the DiT on the N broadcast slots (sizes 1), broadcast back: token-wise ops commute with unmerge."""
    torch.manual_seed(0)
    model = perturb(small(class_dropout=0.0)).eval()
    table = uneven_table()
    gamma, gbar, sizes = table.gamma(8), table.gbar(8), table.sizes(8)
    with torch.no_grad():
        model.pos.copy_(unmerge(merge(model.pos[None], gbar), gamma)[0])
    x, t, y = inputs(8)
    out_k = model(x, t, y, gbar, sizes)  # (B, K, C)
    out_n = model(unmerge(x, gamma), t, y, torch.eye(N), torch.ones(N))  # (B, N, C)
    assert torch.allclose(out_n, unmerge(out_k, gamma), atol=1e-5)
    no_bias = model(x, t, y, gbar, torch.ones(8))
    assert not torch.allclose(out_n, unmerge(no_bias, gamma), atol=1e-3)


def test_per_image_sizes_match_shared():
    torch.manual_seed(0)
    model = perturb(small()).eval()
    table = uneven_table()
    x, t, y = inputs(8)
    shared = model(x, t, y, table.gbar(8), table.sizes(8))
    per_image = model(x, t, y, table.gbar(8).expand(2, N, 8), table.sizes(8).expand(2, 8))
    assert torch.allclose(shared, per_image, atol=1e-6)


def test_k_conditioning_changes_output_with_k():
    torch.manual_seed(0)
    model = perturb(small(k_conditioning=True)).eval()
    table = MergePattern.contiguous(N, [8])
    x, t, y = inputs(8)
    out = model(x, t, y, table.gbar(8), table.sizes(8))
    model.k_embed = None
    assert not torch.allclose(out, model(x, t, y, table.gbar(8), table.sizes(8)))


def test_label_dropout_rate_train_and_eval():
    torch.manual_seed(0)
    emb = LabelEmbedder(10, 8, dropout=0.1)
    y = torch.randint(0, 10, (40_000,))
    rate = (emb.token_drop(y) == 10).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    emb.eval()
    assert torch.equal(emb.token_drop(y), y)
    forced = emb.token_drop(y[:4], torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [10, y[1].item(), 10, y[3].item()]


def test_dit_eval_ignores_dropout_and_forced_drop_is_null():
    torch.manual_seed(0)
    model = perturb(small()).eval()
    table = MergePattern.contiguous(N, [8])
    x, t, y = inputs(8)
    args = (table.gbar(8), table.sizes(8))
    assert torch.equal(model(x, t, y, *args), model(x, t, y, *args))
    forced = model(x, t, y, *args, force_drop_ids=torch.ones(2))
    assert torch.allclose(forced, model(x, t, torch.full_like(y, model.null_label), *args))


@pytest.mark.parametrize("k_conditioning", [False, True])
def test_flops_match_counter(k_conditioning):
    model = create("dit", "tiny", k_conditioning=k_conditioning).eval()
    table = MergePattern.contiguous(32, KS)
    for k in KS:
        x, t, y = torch.randn(1, k, 16), torch.rand(1), torch.zeros(1, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        # The math backend decomposes SDPA into counted matmuls; the CPU flash kernel is not counted.
        with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            model(x, t, y, table.gbar(k), table.sizes(k))
        # FlopCounterMode counts a multiply-add as 2 FLOPs, the same convention as `flops`.
        assert model.flops(k) == pytest.approx(counter.get_total_flops(), rel=0.05)
    # Convex in K: the attention term is quadratic.
    assert model.flops(32) - model.flops(16) > 2 * (model.flops(16) - model.flops(8))


# --- contract tests generated from the registry ---
PARAMS_M = {
    "tiny": (1.0, 1.6), "s": (30, 36), "b": (120, 135), "l": (440, 470), "xl": (650, 690),
    "lgm-b": (120, 135), "lgm-xl": (650, 690),
}  # fmt: skip


@pytest.mark.parametrize("name", list_presets("dit"))
def test_preset_parameter_count(name):
    with torch.device("meta"):
        model = create("dit", name)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    lo, hi = PARAMS_M[name]
    assert lo <= millions <= hi, f"{name}: {millions:.1f}M parameters"


@pytest.mark.parametrize("name", list_presets("dit"))
def test_preset_forward_backward(name):
    torch.manual_seed(0)
    model = create("dit", name, depth=1) if name != "tiny" else create("dit", name)
    n, c = model.cfg.n_slots, model.cfg.channels
    table = MergePattern.contiguous(n, [n // 8])
    k = n // 8
    x, t, y = torch.randn(2, k, c), torch.rand(2), torch.randint(0, 10, (2,))
    out = model(x, t, y, table.gbar(k), table.sizes(k))
    assert out.shape == (2, k, c) and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # Once the zero-initialised branches are open, every parameter gets a non-zero gradient.
    model.zero_grad()
    perturb(model, std=0.02)
    model(x, t, y, table.gbar(k), table.sizes(k)).square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, pname
