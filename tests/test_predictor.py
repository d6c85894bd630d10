"""The single-pass curve predictor: monotone by construction, learns held-out curves, reloads."""

from __future__ import annotations

import torch

from vlt.adaptive.predictor import CurvePredictor, fit_predictor, load_predictor, predict, save_predictor
from vlt.models.pattern import MergePattern

N, C, GRID = 8, 4, [2, 4, 8]


def toy_data(s: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (S, N, C) and non-decreasing curves (S, G) whose level and slope depend on z."""
    z = torch.randn(s, N, C, generator=generator)
    level = 20 + 3 * z[:, 0, 0]  # (S,)
    slope = 1 + z[:, 1, 1].abs()  # (S,)
    return z, level[:, None] + slope[:, None] * torch.arange(len(GRID)).float()  # (S, G)


def test_predicted_curves_are_monotone_in_k():
    torch.manual_seed(0)
    model = CurvePredictor(n_slots=N, channels=C, grid=GRID, width=16, table=MergePattern.contiguous(N, GRID))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=3.0)  # far from any trained state
    y = model(10 * torch.randn(64, N, C))  # (B, G)
    assert y.shape == (64, len(GRID))
    assert (y.diff(dim=1) >= 0).all()


def test_predictor_learns_and_beats_a_constant_curve():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    z, y = toy_data(768, g)
    model = CurvePredictor(n_slots=N, channels=C, grid=GRID, width=32, table=MergePattern.contiguous(N, GRID))
    losses = fit_predictor(model, z[:512], y[:512], steps=300, batch_size=128)
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:20]) / 20
    held = predict(model, z[512:])  # (256, G)
    rmse = (held - y[512:]).square().mean().sqrt()
    baseline = (y[:512].mean(0) - y[512:]).square().mean().sqrt()
    assert rmse < 0.5 * baseline
    # The slope, which allocation depends on, is learned too, not just the level.
    slope_err = (held.diff(dim=1) - y[512:].diff(dim=1)).abs().mean()
    assert slope_err < 0.75 * (y[:512].diff(dim=1).mean() - y[512:].diff(dim=1)).abs().mean()


def test_predictor_round_trips_and_refuses_other_data(tmp_path):
    torch.manual_seed(0)
    z, y = toy_data(64, torch.Generator().manual_seed(1))
    for table in (MergePattern.contiguous(N, GRID), None):
        model = CurvePredictor(n_slots=N, channels=C, grid=GRID, width=16, table=table)
        fit_predictor(model, z, y, steps=5)
        path = save_predictor(tmp_path / "p.pt", model, {"data": 1})
        loaded = load_predictor(path, {"data": 1})
        assert loaded is not None and torch.equal(predict(loaded, z), predict(model, z))
        assert load_predictor(path, {"data": 2}) is None
    assert load_predictor(tmp_path / "missing.pt", {"data": 1}) is None
