"""FID: torchmetrics vs scipy sqrtm, cached real statistics, proxy naming, weights errors; rate helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from vlt.metrics import (
    FrechetDistance,
    ProxyExtractor,
    RealStats,
    RealStatsKey,
    build_fid,
    find_inception_weights,
    frechet_distance,
    make_extractor,
    measured_flops,
    metric_name,
    transformer_flops,
)
from vlt.nn import Attention, Mlp, SwiGLU


class Flatten(nn.Module):
    """Features = the input itself, so the test controls them exactly."""

    num_features = 8

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class Counting(nn.Module):
    """ProxyExtractor that counts how many images it has seen."""

    def __init__(self):
        super().__init__()
        self.inner = ProxyExtractor()
        self.num_features = self.inner.num_features
        self.name = self.inner.name
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.inner(x)


def test_torchmetrics_fid_matches_scipy_sqrtm():
    torch.manual_seed(0)
    real = torch.randn(400, 8, dtype=torch.float64)
    fake = torch.randn(300, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64) * 0.5 + 0.3
    fid = FrechetDistance(feature=Flatten(), reset_real_features=False)
    stock = FrechetInceptionDistance(feature=Flatten(), reset_real_features=False)
    for metric in (fid, stock):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    ours = float(fid.compute())
    mu1, mu2 = real.mean(0).numpy(), fake.mean(0).numpy()
    s1, s2 = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    reference = frechet_distance(mu1, s1, mu2, s2)
    assert reference > 1.0
    assert abs(ours - reference) / reference < 1e-3
    assert abs(float(stock.compute()) - reference) / reference < 1e-3


def test_proxy_extractor_is_fixed_and_deterministic():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(123)  # the global seed must not matter
    a = ProxyExtractor()
    torch.manual_seed(456)
    b = ProxyExtractor()
    fa, fb = a(x), b(x)
    assert fa.shape == (4, a.num_features) and 64 <= a.num_features <= 256
    assert torch.equal(fa, fb)
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training


def test_proxy_fid_grows_with_noise():
    torch.manual_seed(0)
    x = torch.rand(48, 3, 32, 32) * 2 - 1
    fid = build_fid("proxy")
    fid.update(x, real=True)
    values = []
    for sigma in (0.05, 0.2, 0.8):
        fid.reset()  # keeps the real side
        fid.update((x + sigma * torch.randn_like(x)).clamp(-1, 1), real=False)
        values.append(float(fid.compute()))
    assert values[0] < values[1] < values[2]


def test_cached_real_stats_are_reused(tmp_path):
    torch.manual_seed(0)
    real = [torch.rand(16, 3, 32, 32) * 2 - 1 for _ in range(3)]
    fake = torch.rand(24, 3, 32, 32) * 2 - 1
    key = RealStatsKey(dataset="unit/set", extractor="proxy", resolution=32, num_images=48)
    cache = RealStats(cache_dir=tmp_path)

    def evaluate():
        extractor = Counting()
        fid = FrechetDistance(feature=extractor, reset_real_features=False)
        computed = cache.prepare(fid, key, real)
        real_seen = extractor.seen
        fid.update(fake, real=False)
        return computed, real_seen, float(fid.compute())

    first = evaluate()
    second = evaluate()
    assert first[:2] == (True, 48)
    assert second[:2] == (False, 0)  # second evaluation extracts no real features
    assert cache.path(key).is_file() and "/" not in key.filename
    assert abs(first[2] - second[2]) <= 1e-4 * abs(first[2])
    # The same value as accumulating the real side directly in torchmetrics.
    direct = build_fid("proxy")
    for batch in real:
        direct.update(batch, real=True)
    direct.update(fake, real=False)
    assert abs(float(direct.compute()) - first[2]) <= 1e-4 * abs(first[2])


def test_proxy_names_never_claim_fid():
    assert metric_name("rfid", "proxy") == "rfid_proxy"
    assert metric_name("gfid", ProxyExtractor()) == "gfid_proxy"
    assert metric_name("rfid", "inception") == "rfid"
    with pytest.raises(ValueError, match="unknown extractor 'clip'"):
        metric_name("rfid", "clip")
    with pytest.raises(ValueError, match="expected one of"):
        make_extractor("clip")  # type: ignore[arg-type]


def test_missing_inception_weights_say_what_to_put_where(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ValueError, match=r"weights-inception-2015-12-05-6726825d\.pth") as err:
        find_inception_weights(str(missing))
    assert str(missing) in str(err.value) and "vlt[fid]" in str(err.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="torch hub cache"):
        build_fid("inception")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="torch-fidelity"):  # weights present, network package absent
        build_fid("inception", weights=str(tmp_path / "w.pth"))


class Block(nn.Module):
    def __init__(self, dim, hidden, gated):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, 4)
        self.mlp = SwiGLU(dim, hidden) if gated else Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


@pytest.mark.parametrize(("tokens", "gated"), [(16, False), (37, True)])
def test_transformer_flops_match_flop_counter(tokens, gated):
    dim, hidden, depth, batch = 32, 64, 2, 3
    stack = nn.Sequential(*[Block(dim, hidden, gated) for _ in range(depth)])
    measured = measured_flops(stack, torch.randn(batch, tokens, dim), per=batch)
    analytic = transformer_flops(tokens, dim, depth, hidden, gated=gated)
    assert abs(measured - analytic) / analytic < 0.05
