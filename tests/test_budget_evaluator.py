"""The budget evaluator on the pure-torch stage objects, in a plain torch process: no Trainer."""

from __future__ import annotations

import pytest
import torch

from vlt.adaptive.allocation import target_cost
from vlt.metrics import psnr
from vlt.metrics.budget import BudgetEvaluator, budget_scalars
from vlt.models.dit import DiTConfig
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec
from vlt.stages import LatentGenerator, VariableLengthTokenizer

TOK = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)  # N = 32, C = 16, 32x32 images
DIT = DiTConfig(width=32, depth=1, heads=2)
KS = [4, 8, 32]


@pytest.fixture(scope="module")
def stages() -> tuple[VariableLengthTokenizer, LatentGenerator]:
    torch.manual_seed(0)
    pattern = MergePattern.contiguous(32, KS, kind="lgm")
    tok = VariableLengthTokenizer(TOK, pattern).eval()
    gen = LatentGenerator(DIT, pattern, tokenizer=TOK, flow=FlowSpec(sample_steps=2)).eval()
    gen.take_tokenizer(tok, source="the test tokenizer")
    return tok, gen


def images_and_labels(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.arange(n) % 4


def test_a_tokenizer_in_three_lines(stages, tmp_path):
    tok, _ = stages
    images, labels = images_and_labels()
    evaluator = BudgetEvaluator(ks=KS, num_images=8, batch_size=4, replicates=5, cache_dir=str(tmp_path))
    rows = evaluator.evaluate_tokenizer(tok, images, labels)
    assert [(r["k"], r["mode"]) for r in rows] == [(k, "fixed") for k in KS]
    for row in rows:
        assert {"tokens", "flops", "psnr", "psnr_mse", "rfid_proxy", "rfid_proxy_ci"} <= set(row)
        with torch.no_grad():
            expected = psnr(tok.reconstruct(images, row["k"]).clamp(-1, 1), images).mean()
        assert row["psnr"] == pytest.approx(float(expected), rel=1e-5)  # the tokenizer's own reconstruction
        assert row["tokens"] == row["k"] and row["flops"] == tok.flops("reconstruct")
    assert "budget/rfid_proxy_ci@k8" in budget_scalars(rows)
    again = BudgetEvaluator(ks=KS, num_images=8, batch_size=4, replicates=5, cache_dir=str(tmp_path))
    assert again.evaluate_tokenizer(tok, [(images[:4], labels[:4]), (images[4:], labels[4:])]) == rows


def test_quality_targets_read_off_the_per_image_curves(stages, tmp_path):
    tok, _ = stages
    images, labels = images_and_labels()
    with torch.no_grad():
        curves = torch.stack(
            [psnr(tok.reconstruct(images, k).clamp(-1, 1), images).double() for k in KS], dim=1
        )  # (B, G): the oracle's own per-image curves
    floor = float(curves[:, 1].median())
    evaluator = BudgetEvaluator(
        ks=KS, metrics=["psnr"], num_images=8, batch_size=4, targets=[floor], target_shares=[0.5],
        cache_dir=str(tmp_path),
    )  # fmt: skip
    rows = {r["mode"]: r for r in evaluator.evaluate_tokenizer(tok, images, labels)}
    expected = target_cost(curves, KS, floor, 0.5)
    fixed, per_image = rows["target-fixed-p0.5"], rows["target-p0.5"]
    assert fixed["k"] == expected["fixed_k"] and fixed["reached"] >= 0.5 and fixed["floor"] == floor
    assert per_image["tokens"] == pytest.approx(expected["cost"], rel=1e-6) and per_image["reached"] >= 0.5
    assert per_image["saving"] == pytest.approx(fixed["tokens"] / per_image["tokens"], rel=1e-6)
    scalars = budget_scalars(list(rows.values()))
    assert f"budget/saving@target-p0.5_floor{floor:g}" in scalars
    with pytest.raises(ValueError, match=r"targets .* need psnr"):
        BudgetEvaluator(ks=KS, metrics=["rfid"], targets=[20.0])


def test_a_generator_with_guidance_and_a_budget(stages, tmp_path):
    _, gen = stages
    images, labels = images_and_labels()
    options = {"ks": KS, "metrics": ["gfid"], "cfg_scales": [1.0, 2.0], "budgets": [8], "num_images": 8}
    options |= {"batch_size": 4, "replicates": 5, "cache_dir": str(tmp_path)}
    rows = BudgetEvaluator(**options).evaluate_generator(gen, images, labels)
    assert [(r["k"], r["mode"]) for r in rows] == [(4, "fixed"), (8, "fixed"), (32, "fixed"), (8, "adaptive")]
    fixed = rows[0]
    assert {"gfid_proxy_w1", "gfid_proxy_w1_ci", "gfid_proxy_w2", "flops_gfid_proxy_w2"} <= set(fixed)
    assert fixed["flops_gfid_proxy_w2"] > fixed["flops_gfid_proxy_w1"]  # guidance doubles the DiT calls
    adaptive = rows[-1]  # per-image K drawn from {4, 8, 32}: the mean and RMS of the K it used
    assert 4 <= adaptive["tokens"] <= adaptive["k_rms"] <= 32
    assert rows[0]["flops_gfid_proxy_w1"] <= adaptive["flops_gfid_proxy_w1"] <= rows[2]["flops_gfid_proxy_w1"]
    same = BudgetEvaluator(**options).evaluate_generator(gen, images, labels)
    other = BudgetEvaluator(**options, seed=3).evaluate_generator(gen, images, labels)
    assert same == rows and other[0]["gfid_proxy_w1"] != fixed["gfid_proxy_w1"]
    # The real statistics are cached: labels alone now name the real set.
    alone = BudgetEvaluator(**options, resolution=32).evaluate_generator(gen, labels=labels)
    assert alone[0]["gfid_proxy_w1"] == pytest.approx(fixed["gfid_proxy_w1"])


def test_config_scale_is_the_generators_own_scale_at_each_k(stages, tmp_path):
    """`cfg_scales: [.., "config"]` evaluates each K at the generator's per-K w: the same numbers as
    evaluating that K alone at its w explicitly."""
    _, gen = stages
    images, labels = images_and_labels()
    per_k = {4: 3.0, 8: 1.0, 32: 2.0}
    gen.spec.cfg_scales = per_k
    try:
        options = {"metrics": ["gfid"], "num_images": 8, "batch_size": 4, "replicates": 0}
        options |= {"cache_dir": str(tmp_path)}
        rows = BudgetEvaluator(ks=KS, cfg_scales=[1.0, "config"], **options).evaluate_generator(
            gen, images, labels
        )
        for row in rows:
            w = per_k[row["k"]]
            alone = BudgetEvaluator(ks=[row["k"]], cfg_scales=[1.0, w], **options)
            expected = alone.evaluate_generator(gen, images, labels)[0]
            assert row["gfid_proxy_wcfg"] == pytest.approx(expected[f"gfid_proxy_w{w:g}"])
            assert row["flops_gfid_proxy_wcfg"] == expected[f"flops_gfid_proxy_w{w:g}"]
    finally:
        gen.spec.cfg_scales = None
    with pytest.raises(ValueError, match="cfg_scales takes numbers or 'config'"):
        BudgetEvaluator(ks=KS, metrics=["gfid"], cfg_scales=["best"])


def test_what_a_model_cannot_do_is_a_clear_error(stages):
    tok, _ = stages
    with pytest.raises(ValueError, match=r"holds no reconstruction metric"):
        BudgetEvaluator(ks=KS, metrics=["gfid"]).evaluate_tokenizer(tok, images_and_labels()[0])
    with pytest.raises(ValueError, match=r"VariableLengthTokenizer lacks \['budget_flops', "):
        BudgetEvaluator(ks=KS, metrics=["psnr"]).evaluate(tok, images_and_labels()[0])
    with pytest.raises(ValueError, match="labels go with an image tensor"):
        BudgetEvaluator(ks=KS).evaluate_tokenizer(tok, [images_and_labels()[0]], torch.zeros(8))
