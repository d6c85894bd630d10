"""Rectified flow on merged tokens (pooled noise, weighted loss, samplers) and per-position CFG."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from vlt.models.dit import DiT, DiTConfig
from vlt.models.pattern import MergePattern
from vlt.objectives.flow import RectifiedFlow, pooled_noise, token_weights
from vlt.objectives.guidance import combine, guided_velocity, position_scale

N, C = 12, 4
SIZES = [1, 2, 4, 5]  # K = 4 tokens over N = 12 slots


def uneven_table() -> MergePattern:
    rank = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    groups = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    return MergePattern(N, {len(SIZES): groups[rank]})


def dit(**kw) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(n_slots=N, channels=C, width=32, depth=1, heads=2, num_classes=3, **kw))
    with torch.no_grad():  # open the adaLN-Zero branches so the output depends on x, t and y
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


class Oracle(nn.Module):
    """The exact velocity toward a known x1 under x_t = t x1 + (1 - t) eps: (x1 - x_t) / (1 - t)."""

    def __init__(self, x1: Tensor) -> None:
        super().__init__()
        self.x1 = x1

    def forward(self, x, t, y, gbar, sizes):
        return (self.x1 - x) / (1 - t)[:, None, None].clamp_min(1e-6)


class Constant(nn.Module):
    def __init__(self, v: Tensor) -> None:
        super().__init__()
        self.v = v

    def forward(self, x, t, y, gbar, sizes):
        return self.v.expand_as(x)


def test_pooled_noise_variance_is_one_over_size():
    torch.manual_seed(0)
    table = uneven_table()
    eps = pooled_noise(20_000, table.gbar(4), C)  # (B, K, C)
    var = eps.var(dim=(0, 2))
    assert torch.allclose(var, 1 / torch.tensor(SIZES, dtype=torch.float), rtol=0.05)
    assert eps.mean().abs() < 0.01
    corr = torch.corrcoef(eps[..., 0].T)  # tokens pool disjoint slots: uncorrelated
    assert (corr - torch.eye(4)).abs().max() < 0.05


def test_token_weights_sum_to_k():
    sizes = uneven_table().sizes(4)
    assert token_weights(sizes).sum().item() == pytest.approx(4)
    per_image = torch.stack([sizes, torch.full((4,), 3.0)])
    assert torch.allclose(token_weights(per_image).sum(-1), torch.full((2,), 4.0))
    assert torch.allclose(token_weights(sizes), sizes * 4 / N)


def test_training_losses_oracle_is_zero_and_convention_is_consistent():
    torch.manual_seed(0)
    table = uneven_table()
    x1 = torch.randn(8, 4, C)
    out = RectifiedFlow().training_losses(
        Oracle(x1), x1, torch.zeros(8).long(), table.gbar(4), table.sizes(4)
    )
    assert set(out) == {"loss", "mse"}
    assert out["loss"].item() < 1e-8 and out["mse"].item() < 1e-8


def test_training_loss_unmerged_equals_mse_and_backprops():
    torch.manual_seed(0)
    model = dit()
    gbar, sizes = torch.eye(N), torch.ones(N)
    out = RectifiedFlow().training_losses(model, torch.randn(4, N, C), torch.arange(4) % 3, gbar, sizes)
    assert torch.allclose(out["loss"], out["mse"])
    out["loss"].backward()
    assert model.final.linear.weight.grad.abs().sum() > 0


def test_training_loss_weights_big_tokens():
    """A constant error e_j on token j costs mean_j(m_j K / N e_j): only big tokens' error here."""
    torch.manual_seed(0)
    table = uneven_table()
    flow = RectifiedFlow()
    x1 = torch.zeros(2000, 4, C)
    base = flow.training_losses(Oracle(x1), x1, torch.zeros(2000).long(), table.gbar(4), table.sizes(4))
    shift = torch.tensor([0.0, 0.0, 0.0, 1.0])[None, :, None]  # unit error on the m=5 token only

    class Off(Oracle):
        def forward(self, *args):
            return super().forward(*args) + shift

    out = flow.training_losses(Off(x1), x1, torch.zeros(2000).long(), table.gbar(4), table.sizes(4))
    assert base["loss"].item() < 1e-8
    assert out["mse"].item() == pytest.approx(1 / 4, rel=1e-4)
    assert out["loss"].item() == pytest.approx(5 * 4 / N / 4, rel=1e-4)


def test_logit_normal_times():
    t = RectifiedFlow(t_mean=0.0, t_std=1.0).sample_t(
        50_000, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    assert t.min() > 0 and t.max() < 1
    assert torch.logit(t).std().item() == pytest.approx(1.0, rel=0.03)
    with pytest.raises(ValueError, match="t_std"):
        RectifiedFlow(t_std=0.0)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_constant_velocity_starts_from_pooled_noise(method):
    table = uneven_table()
    v = torch.randn(1, 4, C)
    x = RectifiedFlow().sample(
        Constant(v), y=torch.zeros(3).long(), gbar=table.gbar(4), sizes=table.sizes(4), steps=5,
        method=method, generator=torch.Generator().manual_seed(1), channels=C, null_label=3,
    )  # fmt: skip
    x0 = pooled_noise(3, table.gbar(4), C, torch.Generator().manual_seed(1))
    assert torch.allclose(x, x0 + v, atol=1e-5)


def test_euler_reaches_the_oracle_target():
    table = uneven_table()
    x1 = torch.randn(3, 4, C)
    x = RectifiedFlow().sample(
        Oracle(x1), y=torch.zeros(3).long(), gbar=table.gbar(4), sizes=table.sizes(4), steps=7,
        channels=C, null_label=3,
    )  # fmt: skip
    assert torch.allclose(x, x1, atol=1e-4)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_deterministic_under_seed(method):
    model = dit().train()
    table = uneven_table()
    kw = {"y": torch.arange(3) % 3, "gbar": table.gbar(4), "sizes": table.sizes(4), "steps": 4}
    kw |= {"method": method, "cfg_scale": 3.0, "cfg_interval": (0.2, 1.0)}
    flow = RectifiedFlow()
    a = flow.sample(model, generator=torch.Generator().manual_seed(7), **kw)
    b = flow.sample(model, generator=torch.Generator().manual_seed(7), **kw)
    c = flow.sample(model, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (3, 4, C) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="euler"):
        flow.sample(model, **{**kw, "method": "rk4"})


# --- classifier-free guidance ---
def test_position_scale():
    sizes = torch.tensor([1.0, 2.0, 4.0])
    assert torch.allclose(position_scale(3.0, sizes).flatten(), torch.tensor([3.0, 2.0, 1.5]))
    assert position_scale(3.0, sizes.expand(2, 3)).shape == (2, 3, 1)


def test_cfg_scale_one_returns_conditional_prediction():
    torch.manual_seed(0)
    model, table = dit().eval(), uneven_table()
    x, t, y = torch.randn(2, 4, C), torch.rand(2), torch.tensor([0, 2])
    args = (x, t, y, table.gbar(4), table.sizes(4))
    v = guided_velocity(model, *args, scale=1.0, null_label=3)
    assert torch.allclose(v, model(*args), atol=1e-6)


def test_cfg_moves_every_channel_per_position():
    torch.manual_seed(0)
    model, table = dit().eval(), uneven_table()
    x, t, y = torch.randn(2, 4, C), torch.rand(2), torch.tensor([0, 2])
    gbar, sizes = table.gbar(4), table.sizes(4)
    v_c = model(x, t, y, gbar, sizes)
    v_u = model(x, t, torch.full_like(y, 3), gbar, sizes)
    v = guided_velocity(model, x, t, y, gbar, sizes, scale=4.0, null_label=3)
    # every channel of every token moves (DiT's `[:, :3]` would leave channel 3 unguided)
    assert ((v - v_c).abs() > 1e-6).all()
    s = (1 + 3.0 / sizes)[None, :, None]
    assert torch.allclose(v, v_u + s * (v_c - v_u), atol=1e-5)
    assert torch.allclose(combine(v_c, v_u, 4.0, torch.ones(4)), v_u + 4 * (v_c - v_u), atol=1e-6)


def test_cfg_interval_guides_only_inside():
    torch.manual_seed(0)
    model, table = dit().eval(), uneven_table()
    x, t, y = torch.randn(2, 4, C), torch.tensor([0.1, 0.8]), torch.tensor([0, 2])
    gbar, sizes = table.gbar(4), table.sizes(4)
    v_c = model(x, t, y, gbar, sizes)
    v = guided_velocity(model, x, t, y, gbar, sizes, scale=4.0, null_label=3, interval=(0.5, 1.0))
    assert torch.allclose(v[0], v_c[0], atol=1e-6)
    assert not torch.allclose(v[1], v_c[1], atol=1e-4)


class Recorder(nn.Module):
    """Velocity t * (1 + label) per element; records (t, batch size) of every call (2B = guided)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, int]] = []

    def forward(self, x, t, y, gbar, sizes):
        self.calls.append((float(t[0]), x.shape[0]))
        return t[:, None, None] * (1.0 + y.float())[:, None, None] * torch.ones_like(x)


# Hand-computed: grid i/4 warped by t' = 0.3 t / (1 - 0.7 t).
SHIFTED = [0.0, 0.075 / 0.825, 0.15 / 0.65, 0.225 / 0.475, 1.0]


def _run(method: str, interval, shift: float = 0.3, scale: float = 4.0):
    from vlt.objectives.flow import time_grid

    model, gbar = Recorder(), uneven_table().gbar(len(SIZES))
    y = torch.tensor([0, 1])
    x = RectifiedFlow().sample(
        model, y=y, gbar=gbar, sizes=uneven_table().sizes(len(SIZES)), steps=4, method=method, shift=shift,
        cfg_scale=scale, cfg_interval=interval, generator=torch.Generator().manual_seed(0), channels=C,
        null_label=2,
    )  # fmt: skip
    x0 = pooled_noise(2, gbar, C, torch.Generator().manual_seed(0))
    return model.calls, x - x0, time_grid(4, shift)


def test_time_grid_with_shift_is_the_hand_computed_schedule():
    from vlt.objectives.flow import time_grid

    assert time_grid(4, 0.3) == pytest.approx(SHIFTED, abs=1e-12)
    assert time_grid(4) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError):
        time_grid(4, 0.0)


def test_euler_with_shift_and_cfg_interval_follows_the_schedule():
    """Calls at the left end of each shifted step; guided (batch 2B) only where t' in [0.1, 1]; the state
    moves by sum dt_i * v(t_i), with the guided velocity where guidance is on."""
    calls, moved, _ = _run("euler", (0.1, 1.0))
    assert [t for t, _ in calls] == pytest.approx(SHIFTED[:-1])
    assert [b for _, b in calls] == [2, 2, 4, 4]  # t' = 0, 0.091 unguided; 0.231, 0.474 guided
    # v_cond = t (1 + y), v_uncond = t (1 + null=2) = 3t; guided = v_u + s (v_c - v_u), s = 1 + 3 / m_j.
    s = 1 + 3.0 / torch.tensor(SIZES, dtype=torch.float64)
    for i, label in enumerate((0, 1)):
        expect = torch.zeros(len(SIZES), dtype=torch.float64)
        for t0, t1 in itertools.pairwise(SHIFTED):
            vc, vu = t0 * (1 + label), 3 * t0
            v = vu + s * (vc - vu) if t0 >= 0.1 else torch.full_like(s, vc)
            expect += (t1 - t0) * v
        torch.testing.assert_close(moved[i, :, 0].double(), expect, rtol=1e-5, atol=1e-6)


def test_heun_with_shift_evaluates_both_ends_of_each_step():
    calls, _, grid = _run("heun", (0.1, 1.0))
    expect = [t for t0, t1 in itertools.pairwise(grid) for t in (t0, t1)]
    assert [t for t, _ in calls] == pytest.approx(expect)
    assert [b for _, b in calls] == [4 if t >= 0.1 else 2 for t in expect]


def test_flow_spec_scale_per_k_and_model_calls_follow_the_interval():
    from vlt.objectives.flow import FlowSpec

    spec = FlowSpec(
        sample_steps=4,
        timestep_shift=0.3,
        cfg_scale=1.5,
        cfg_scales={4: 10.5, 8: 8.0},
        cfg_interval=(0.1, 1.0),
    )
    assert (spec.scale_at(4), spec.scale_at(8), spec.scale_at(16), spec.scale_at(None)) == (
        10.5,
        8.0,
        1.5,
        1.5,
    )
    assert spec.model_calls(k=4) == 4 + 2  # two of the four Euler times are inside [0.1, 1]
    assert spec.model_calls(cfg_scale=1.0) == 4
    assert (
        FlowSpec(sample_steps=4, sampler="heun", timestep_shift=0.3, cfg_interval=(0.1, 1.0)).model_calls()
        == 8 + 5  # inside [0.1, 1]: 0.231, 0.231, 0.474, 0.474, 1.0
    )
    with pytest.raises(ValueError):
        FlowSpec(timestep_shift=-1.0)
