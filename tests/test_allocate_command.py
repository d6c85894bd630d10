"""`vlt allocate` and the distortion curves of `vlt cache-latents`: a hand-made cache (fast) and the
session's tiny tokenizer cache (slow, real curves)."""

from __future__ import annotations

import glob
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from vlt.adaptive.distortion import png_size
from vlt.cli import main as vlt
from vlt.data.cache import Curves, LatentCache, load_allocation, load_ks
from vlt.models.pattern import MergePattern

N, C, GRID = 8, 4, [2, 4, 8]


@pytest.fixture
def toy_cache(tmp_path) -> Path:
    """A cache whose PSNR gain per level grows with complexity (so K_i should follow complexity)."""
    g = torch.Generator().manual_seed(0)
    MergePattern.contiguous(N, GRID).save(tmp_path / "pattern.json")
    for split, s in (("train", 200), ("val", 80)):
        complexity = torch.randint(0, 11, (s,), generator=g)
        z = torch.randn(s, N, C, generator=g) * (1 + complexity[:, None, None] / 5)
        slope = 0.2 + complexity.float() / 2 + 0.3 * torch.rand(s, generator=g)
        psnr = 30 - complexity[:, None].float() + slope[:, None] * torch.tensor([0.0, 1.0, 1.6])  # (S, G)
        keys = [f"{split}_{i:04d}" for i in range(s)]
        curves = Curves(keys, psnr.numpy(), (torch.arange(s) % 3).numpy(), complexity.numpy(),
                        (400 + 90 * complexity).numpy(), GRID)  # fmt: skip
        LatentCache(tmp_path).save_curves(split, 0, curves)
        with wds.TarWriter(str(tmp_path / f"{split}-r00-000000.tar")) as sink:
            for key, zi in zip(keys, z, strict=True):
                sink.write({"__key__": key, "latent.npy": zi.numpy()})
    return tmp_path


def cached_keys(cache: Path, split: str) -> set[str]:
    keys = set()
    for shard in cache.glob(f"{split}-r*-*.tar"):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".")[0] for m in tar if m.name.endswith(".latent.npy")}
    return keys


def check_allocation(cache: Path, budget: float) -> dict:
    """The written allocation covers every cached key, round-trips its budget, logs event files."""
    meta = load_allocation(cache)
    assert meta["budget"] == budget and meta["distortion"] == "neg_psnr"
    grid = meta["grid"]
    for split in ("train", "val"):
        ks = load_ks(cache, split)
        assert set(ks) == cached_keys(cache, split)
        assert set(ks.values()) <= set(grid)
        assert np.mean(list(ks.values())) == pytest.approx(meta["mean_k"][split])
    assert meta["mean_k"]["train"] <= budget + 1e-9
    p = np.asarray(meta["p_k_given_class"])
    assert p.shape == (meta["num_classes"] + 1, len(grid)) and np.allclose(p.sum(1), 1)
    assert set(meta["fixed_psnr"]["val"]) == {str(k) for k in grid}
    assert glob.glob(str(cache / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    return meta


def test_allocate_on_a_hand_made_cache(toy_cache, capsys):
    vlt(["allocate", "--cache", str(toy_cache), "--budget", "4"])
    meta = check_allocation(toy_cache, 4.0)
    assert "| val |" in capsys.readouterr().out
    # Images that gain more per token get more tokens; equal mean K beats fixed K = 4.
    assert meta["spearman"]["val"]["complexity"] > 0.5
    assert meta["psnr"]["train"] > meta["fixed_psnr"]["train"]["4"]
    assert meta["num_classes"] == 3
    # D = MSE spends tokens where the absolute error is large: the pooled (mean-MSE) PSNR improves.
    vlt(["allocate", "--cache", str(toy_cache), "--budget", "4", "--distortion", "mse"])
    mse = load_allocation(toy_cache)
    assert mse["distortion"] == "mse" and mse["mean_k"]["train"] <= 4
    assert mse["pooled_psnr"]["train"] > mse["fixed_pooled_psnr"]["train"]["4"]


def test_allocate_reports_the_tokens_a_quality_target_needs(toy_cache, capsys):
    vlt(
        [
            "allocate",
            "--cache",
            str(toy_cache),
            "--budget",
            "4",
            "--floors",
            "25",
            "28",
            "--shares",
            "0.5",
            "0.9",
        ]
    )
    out = capsys.readouterr().out
    assert "tokens for a quality target" in out and "| val | 25 | 0.9 |" in out
    rows = load_allocation(toy_cache)["targets"]
    assert len(rows) == 2 * 2 * 2  # splits x floors x shares
    val = torch.as_tensor(LatentCache(toy_cache).curves("val").psnr).double()  # (S, G)
    for r in (r for r in rows if r["split"] == "val" and r["fixed_k"] is not None):
        j = GRID.index(r["fixed_k"])
        assert float((val[:, j] >= r["floor"]).double().mean()) >= r["share"]  # the fixed K reaches it
        assert j == 0 or float((val[:, j - 1] >= r["floor"]).double().mean()) < r["share"]  # and is the least
        assert r["cost"] <= r["fixed_k"]  # a K per image never needs more


def test_allocate_from_the_predictor(toy_cache):
    meta = vlt_allocate(toy_cache, "--source", "predictor", "--predictor_steps", "60")
    report = meta["predictor"]
    assert report["trained"] and (toy_cache / "predictor.pt").exists()
    assert 0 <= report["val"]["equal_fraction"] <= 1
    assert report["val_rmse_db"] < report["val_rmse_constant_db"]
    again = vlt_allocate(toy_cache, "--source", "predictor", "--predictor_steps", "60")
    assert not again["predictor"]["trained"] and again["mean_k"] == meta["mean_k"]


def vlt_allocate(cache: Path, *args: str) -> dict:
    vlt(["allocate", "--cache", str(cache), "--budget", "4", *args])
    return load_allocation(cache)


def test_threshold_rule_reaches_tau(toy_cache):
    vlt(["allocate", "--cache", str(toy_cache), "--rule", "threshold", "--tau", "27"])
    curves, ks = LatentCache(toy_cache).curves("val"), load_ks(toy_cache, "val")
    for key, row in zip(curves.keys, curves.psnr, strict=True):
        ok = [k for k, p in zip(GRID, row, strict=True) if p >= 27]
        assert ks[key] == (ok[0] if ok else GRID[-1])


def test_bad_options_and_missing_curves_are_clear_errors(toy_cache, tmp_path_factory):
    from vlt.adaptive.command import allocate

    with pytest.raises(ValueError, match=r"cost='k3'.*'k2'"):
        allocate(cache=str(toy_cache), budget=4, cost="k3")
    with pytest.raises(ValueError, match="needs --budget"):
        allocate(cache=str(toy_cache))
    with pytest.raises(FileNotFoundError, match="vlt cache-latents"):
        allocate(cache=str(tmp_path_factory.mktemp("empty")), budget=4)


@pytest.mark.slow
def test_cached_curves_equal_the_tokenizers_psnr(tiny_latents, tiny_tokenizer, tiny_shards):
    from vlt.lit.tokenizer import LitTokenizer
    from vlt.objectives.recon import psnr

    tok = LitTokenizer.load_from_checkpoint(tiny_tokenizer).eval()
    curves = LatentCache(tiny_latents).curves("val")
    assert curves.grid == tok.pattern().ks and len(curves.keys) == 64
    images = {
        s["__key__"]: s
        for s in wds.WebDataset(sorted(glob.glob(tiny_shards["val"])), shardshuffle=False).decode("rgb8")
    }
    metas = {
        s["__key__"]: json.loads(s["json"])
        for s in wds.WebDataset(sorted(map(str, tiny_latents.glob("val-*.tar"))), shardshuffle=False)
    }
    for i in (0, 17):
        key = curves.keys[i]
        pixels = np.array(images[key]["png"])  # (H, W, 3) uint8
        img = torch.tensor(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            expect = [float(psnr(img, tok.reconstruct(img, k))[0]) for k in curves.grid]
        assert np.allclose(curves.psnr[i], expect, atol=1e-3)
        assert np.allclose(metas[key]["psnr"], expect, atol=1e-3)
        assert curves.png_bytes[i] == metas[key]["png_bytes"] == png_size(pixels)
        assert curves.label[i] == int(images[key]["cls"])


@pytest.mark.slow
def test_allocate_end_to_end_on_the_tiny_cache(tiny_latents, tmp_path):
    cache = tmp_path / "latents"
    shutil.copytree(tiny_latents, cache)  # the session cache stays as other tests expect it
    vlt(["allocate", "--cache", str(cache), "--budget", "8", "--cost", "k2"])
    meta = check_allocation(cache, 8.0)
    assert meta["cost"] == "k2" and meta["mean_cost"]["train"] <= 8 + 1e-9
    assert "NaN" not in (cache / "allocation.json").read_text()


def test_fixed_k_between_grid_levels_is_time_sharing():
    from vlt.adaptive.command import fixed_at

    psnr = {4: 10.0, 8: 12.0, 16: 13.0, 32: 14.0}
    assert fixed_at(psnr, 8, "k") == 12.0
    assert fixed_at(psnr, 6, "k") == pytest.approx(11.0)  # half the images at 4, half at 8
    assert fixed_at(psnr, 6, "k2") == pytest.approx(10 + 2 * (36 - 16) / (64 - 16))  # mean K^2 = 36
    assert fixed_at(psnr, 3, "k") == 10.0 and fixed_at(psnr, 40, "k") == 14.0
