"""Coarse-to-fine sampling: token splits keep the flow's noise marginals, schedules, decisions, FLOPs."""

from __future__ import annotations

import pytest
import torch

from vlt.adaptive.coarse import CoarseDecider, fit_decider_predictor
from vlt.models.dit import DiTConfig
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.schedule import KSchedule, split_path, split_tokens
from vlt.stages import LatentGenerator

TOK = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)  # N = 32, C = 16
DIT = DiTConfig(width=32, depth=1, heads=2, num_classes=4)

# Nested cuts with unequal sizes over N = 8 slots: {0..4}{5..7} -> {0,1}{2,3,4}{5}{6,7} -> singletons.
UNEVEN = MergePattern(
    8,
    {
        2: torch.tensor([0, 0, 0, 0, 0, 1, 1, 1]),
        4: torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]),
        8: torch.arange(8),
    },
)


def _cov_z(samples: torch.Tensor, cov: torch.Tensor) -> float:
    """Largest |empirical - true| covariance entry in units of its standard error (Gaussian data)."""
    s = samples.double()
    emp = s.T @ s / len(s)  # mean is zero by construction
    se = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / len(s)).sqrt()
    return float(((emp - cov).abs() / se).max())


@pytest.mark.parametrize("detail", [0.0, 1.0])
@pytest.mark.parametrize(
    ("pattern", "ka", "kb"),
    [(UNEVEN, 2, 4), (UNEVEN, 2, 8), (UNEVEN, 4, 8), (MergePattern.truncation(8, [3, 6]), 3, 6)],
)
def test_split_keeps_the_pooled_noise_marginals_and_merges_back_to_the_parent(pattern, ka, kb, detail):
    s, c, t = 40_000, 1, 0.6
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, pattern.n, c, generator=g).expand(s, -1, -1)  # one fixed data point
    eps = torch.randn(s, pattern.n, c, generator=g)
    x_a = t * pattern.merge(z, ka) + (1 - t) * pattern.merge(eps, ka)  # (S, Ka, C) a coarse flow state
    fresh = torch.randn(s, pattern.n, c, generator=g)
    x_b = split_tokens(x_a, t, pattern.gbar(ka), pattern.gbar(kb), fresh, detail)
    # Data: each child sits at its parent's cluster mean (dropped slots at 0), plus the drawn detail.
    parent = pattern.merge(pattern.unmerge(pattern.merge(z, ka)), kb)  # (S, Kb, C)
    rest = (x_b - t * parent)[..., 0]  # (S, Kb)
    gbar = pattern.gbar(kb).double()
    p = (pattern.gamma(ka) @ pattern.gbar(ka).T).double()  # (N, N) the coarse projector
    # Cov of (1 - t) Gbar^T eps (the fine pooled noise, diag(1 / m_l)) + t sigma Gbar^T (I - P) xi.
    cov = (1 - t) ** 2 * gbar.T @ gbar + (t * detail) ** 2 * gbar.T @ (
        torch.eye(pattern.n).double() - p
    ) @ gbar
    assert _cov_z(rest, cov) < 4.5
    assert float(rest.mean(0).abs().max()) < 4.5 / s**0.5
    # The split never moves the coarse state: the children merge back to the parent exactly.
    back = pattern.merge(pattern.unmerge(x_b), ka)
    assert torch.allclose(back, x_a, atol=1e-5)


def test_a_naive_split_fails_the_marginal_check():
    """The check above has power: copying the parent's pooled noise into its children is rejected."""
    s, pattern = 40_000, UNEVEN
    eps = torch.randn(s, 8, 1, generator=torch.Generator().manual_seed(1))
    copied = pattern.merge(pattern.unmerge(pattern.merge(eps, 2)), 4)[..., 0]  # (S, 4)
    gbar = pattern.gbar(4).double()
    assert _cov_z(copied, gbar.T @ gbar) > 20


def test_schedule_text_steps_and_capping():
    sched = KSchedule.parse("4,8@0.3,16@0.6")
    assert sched.phases == ((0.0, 4), (0.3, 8), (0.6, 16)) and str(sched) == "4,8@0.3,16@0.6"
    grid = [i / 10 for i in range(11)]
    assert sched.ks_per_step(grid) == [4, 4, 4, 8, 8, 8, 16, 16, 16, 16]
    assert KSchedule.parse("4,8@0.05,16@0.5").ks_per_step(grid) == [4] + [8] * 4 + [16] * 5
    assert KSchedule.parse("4,8@0.25,16@0.3").ks_per_step(grid) == [4] * 3 + [16] * 7  # 8 gets no step
    assert sched.capped(8) == KSchedule(((0.0, 4), (0.3, 8)))
    assert sched.capped(4) == KSchedule.constant(4)
    for bad in ("8,4@0.5", "4,8", "4,8@1.0", "x"):
        with pytest.raises(ValueError, match="K schedule"):
            KSchedule.parse(bad)


def _generator(flow=None) -> LatentGenerator:
    torch.manual_seed(0)
    gen = LatentGenerator(DIT, MergePattern.contiguous(32, [4, 8, 16, 32]), tokenizer=TOK, flow=flow)
    for p in gen.dit.parameters():  # a random but not zero-initialised velocity field
        torch.nn.init.normal_(p, std=0.05)
    return gen.eval()


def test_a_schedule_that_never_changes_k_is_plain_sampling():
    gen, labels = _generator(), torch.tensor([0, 1, 2, 3])
    plain = gen.generate_latents(labels, 8, generator=torch.Generator().manual_seed(3))
    for k in (KSchedule.constant(8), "8", KSchedule.parse("8,16@0.4,32@0.8").capped(8)):
        same = gen.generate_latents(labels, k, generator=torch.Generator().manual_seed(3))
        assert torch.equal(same, plain)
    grown = gen.generate_latents(labels, "4,8@0.5", generator=torch.Generator().manual_seed(3))
    assert grown.shape == plain.shape and not torch.allclose(grown, plain)
    with pytest.raises(ValueError, match="not nested"):
        LatentGenerator(DIT, MergePattern(32, {4: torch.arange(32) % 4, 8: torch.arange(32) // 4})).schedule(
            "4,8@0.5"
        )


def test_flops_of_a_schedule_are_the_sum_of_its_phases():
    from vlt.objectives.flow import FlowSpec

    gen = _generator(FlowSpec(sample_steps=10, cfg_scale=2.0, cfg_interval=(0.0, 0.45)))
    decode = gen.tokenizer.flops("decode")
    # Steps at t = 0, .1, ..., .9: 3 at K=4, 3 at K=8, 4 at K=16; guided (2 calls) while t <= 0.45.
    phases = [(3 * 2, 4), (2 * 2 + 1, 8), (4, 16)]
    expected = sum(calls * gen.dit.flops(k) for calls, k in phases) + decode
    assert gen.flops("4,8@0.3,16@0.6") == pytest.approx(expected)
    assert gen.flops("16") == pytest.approx(5 * 2 * gen.dit.flops(16) + 5 * gen.dit.flops(16) + decode)
    plain = 5 * 2 * gen.dit.flops(8) + 5 * gen.dit.flops(8) + decode
    assert gen.flops(8) == pytest.approx(plain)
    # A decision at t = 0.3 costs one more call at the K in use then (K = 4).
    assert gen.decided_flops("4,8@0.3,16@0.6", 8, 0.3) == pytest.approx(
        gen.flops("4,8@0.3") + gen.dit.flops(4)
    )


def test_per_image_decisions_keep_order_labels_and_noise():
    gen, labels = _generator(), torch.tensor([0, 1, 2, 3, 1, 0])
    sched = "4,8@0.2,16@0.5,32@0.8"
    rule = lambda tokens, y: torch.tensor([8, 32, 16, 32, 32, 8])
    mixed = gen.generate_decided(labels, sched, rule, 0.4, generator=torch.Generator().manual_seed(5))
    assert mixed.ks.tolist() == [8, 32, 16, 32, 32, 8]
    for k in (8, 16, 32):
        const = lambda tokens, y, k=k: torch.full((len(y),), k)
        alone = gen.generate_decided(labels, sched, const, 0.4, generator=torch.Generator().manual_seed(5))
        at = mixed.ks == k
        assert torch.allclose(mixed.images[at], alone.images[at], atol=1e-5)  # image i is image i
    # Everyone at the final K is the plain schedule (same noise in the same order).
    full = gen.generate(labels, sched, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(alone.images, full, atol=1e-5)
    with pytest.raises(ValueError, match=r"allowed: \[8, 16, 32\]"):
        gen.generate_decided(labels, sched, lambda t, y: torch.full((len(y),), 4), 0.4)
    with pytest.raises(ValueError, match=r"allowed: \[8, 16\]"):  # never above the schedule's final K
        gen.generate_decided(labels, "4,8@0.2,16@0.5", lambda t, y: torch.full((len(y),), 32), 0.4)


def test_the_coarse_decider_learns_curves_and_applies_its_rules():
    gen = _generator()
    g = torch.Generator().manual_seed(0)
    z, labels = torch.randn(256, 32, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    busy = z[:, :4].mean(dim=(1, 2))  # a curve that the coarse tokens determine
    grid = [8, 16, 32]
    psnr = 20 + torch.tensor(grid).float() / 8 - 4 * busy[:, None]  # (S, G), rising in K
    predictor = fit_decider_predictor(gen, z, labels, psnr, grid, k=4, at=0.4, steps=300, width=32)
    floor = CoarseDecider(predictor, floor=22.0)
    budget = CoarseDecider(predictor, budget=16.0)
    with torch.no_grad():
        tokens = gen.denormalise(gen.normalise(gen.pattern.merge(z[:64], 4)))
        ks_floor, ks_budget = floor(tokens), budget(tokens)
    assert set(ks_floor.tolist()) <= set(grid) and len(set(ks_floor.tolist())) > 1
    assert abs(float(ks_budget.double().mean()) - 16.0) < 2.0
    with pytest.raises(ValueError, match="exactly one rule"):
        CoarseDecider(predictor)
    with pytest.raises(ValueError, match="chooses among K >= 16"):
        fit_decider_predictor(gen, z, labels, psnr, grid, k=16, at=0.4)


def test_split_training_states_lead_straight_to_the_data():
    """The split-aware target reaches x1 from its state; s = 0 is plain flow matching, s = t a split."""
    g = torch.Generator().manual_seed(0)
    x1, parent, eps = (torch.randn(6, 4, 3, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.95])
    s = torch.tensor([0.0, 0.3, 0.2, 0.6, 0.7, 0.0])
    x_t, v = split_path(x1, parent, eps, t, s)
    tt = t[:, None, None]
    assert torch.allclose(x_t + (1 - tt) * v, x1, atol=1e-5)  # one Euler step to t = 1 lands on the data
    plain = s == 0
    assert torch.allclose(x_t[plain], (tt * x1 + (1 - tt) * eps)[plain], atol=1e-6)
    assert torch.allclose(v[plain], (x1 - eps)[plain], atol=1e-6)
    at_split = s == t  # right after the split: children at their parents' means, fine noise
    assert torch.allclose(x_t[at_split], (tt * parent + (1 - tt) * eps)[at_split], atol=1e-6)
    from vlt.objectives.flow import RectifiedFlow

    path = RectifiedFlow().split_noisy(x1, parent, torch.eye(4), prob=0.0, max_t=0.7)
    assert torch.allclose(path.target, x1 - path.eps, atol=1e-6)  # prob 0: nothing changes


@pytest.mark.slow
def test_coarse_to_fine_budget_rows_of_a_dit_trained_for_splits(tiny_dit, tiny_vltnet, tiny_shards, tmp_path):
    from vlt import load
    from vlt.metrics.budget import BudgetEvaluator, CoarseToFineBudget
    from vlt.metrics.budget.data import read_shard_images

    gen = load(str(tiny_dit)).eval()
    assert gen.spec.split_prob == 0.5  # the fixture's fit trained with split states
    with pytest.raises(ValueError, match="K=32 is never reached"):
        gen.flops("4,32@0.75")  # the fixture samples with 2 steps: t = 0 and 0.5
    gen.spec.sample_steps = 8
    g = torch.Generator().manual_seed(0)
    z, labels = (
        torch.randn(64, 32, gen.dit.cfg.channels, generator=g),
        torch.randint(0, 10, (64,), generator=g),
    )
    grid = [8, 16, 32]
    psnr = 20 + torch.tensor(grid).float() / 8 - 4 * z[:, :4].mean(dim=(1, 2))[:, None]
    predictor = fit_decider_predictor(gen, z, labels, psnr, grid, k=4, at=0.5, steps=50, width=16)
    with pytest.raises(ValueError, match="reads K=4 tokens"):  # at t = 0.5 the schedule is at K = 8
        gen.generate_decided(labels[:2], "4,8@0.25,32@0.75", CoarseDecider(predictor, floor=20.0), 0.5)
    predictor = fit_decider_predictor(gen, z, labels, psnr, grid, k=8, at=0.5, steps=50, width=16)
    module = CoarseToFineBudget(
        gen, "4,8@0.25,16@0.5,32@0.75", at=0.5, decider=lambda b: CoarseDecider(predictor, budget=b)
    )
    images, y = read_shard_images(tiny_shards["val"], 16, 32, 16)
    evaluator = BudgetEvaluator(
        ks=[8, 16, 32], budgets=[16.0], metrics=["gfid"], num_images=16, batch_size=16,
        cache_dir=str(tmp_path), feature_net=str(tiny_vltnet), feature_scores=["fd"], replicates=10,
    )  # fmt: skip
    rows = evaluator.evaluate(module, torch.cat(images), torch.cat(y))
    fixed = {r["k"]: r for r in rows if r["mode"] == "fixed"}
    for k, row in fixed.items():  # row K samples the schedule capped at K and is priced that way
        assert row["flops"] == pytest.approx(gen.flops(KSchedule.parse("4,8@0.25,16@0.5,32@0.75").capped(k)))
        assert row["gfd_vltnet"] == row["gfd_vltnet"]
    (adaptive,) = [r for r in rows if r["mode"] == "adaptive"]
    assert 8 <= adaptive["tokens"] <= 32 and adaptive["gfd_vltnet"] == adaptive["gfd_vltnet"]
    # Each image's FLOPs: its capped schedule plus the decision call at K = 8 (in use at t = 0.5).
    lo = gen.decided_flops("4,8@0.25,16@0.5,32@0.75", 8, 0.5)
    hi = gen.decided_flops("4,8@0.25,16@0.5,32@0.75", 32, 0.5)
    assert lo <= adaptive["flops"] <= hi and hi == pytest.approx(fixed[32]["flops"] + gen.dit.flops(8))
