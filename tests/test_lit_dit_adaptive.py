"""Content-adaptive K in stage 2: K conditioning, per-batch K from the data, sampling at a mean-K budget."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.conftest import ROOT, TINY_DIT, budget_overrides
from vlt import load as vlt_load
from vlt.adaptive.allocation import k_histogram
from vlt.cli import main as vlt
from vlt.data.cache import LatentCache
from vlt.lit import LitDiT
from vlt.lit.dit import batch_k
from vlt.models.dit import DiTConfig
from vlt.types import LatentBatch

GRID = [4, 8, 16, 32]
SMALL = {"n_slots": 32, "channels": 4, "width": 32, "depth": 1, "heads": 2, "num_classes": 3}


def write_allocation(root: Path, probs: list[list[float]], grid: list[int] = GRID) -> Path:
    meta = {"rule": "test", "cost": "k", "budget": 12.0, "lambda": 0.0, "grid": grid, "num_classes": 3}
    meta |= {"p_k_given_class": probs, "mean_k": {"train": 12.0}}
    return LatentCache(root).save_allocation(meta, {})


@pytest.fixture
def skewed(tmp_path) -> Path:
    """Class 0 prefers small K, class 2 large K; the last row is all images."""
    rows = [[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.1, 0.2, 0.7], [0.3, 0.2, 0.2, 0.3]]
    return write_allocation(tmp_path, rows)


def adaptive(path: Path, **dit) -> LitDiT:
    """An adaptive LitDiT shaped by and filled from an allocation file (no cache needed)."""
    cfg = DiTConfig(**{**SMALL, "k_conditioning": True, **dit})
    model = LitDiT(
        **LitDiT.resolve_sources({"dit": cfg, "ks": GRID, "k_source": "data", "allocation": str(path)})
    )
    model.load_sources()
    return model


def test_data_mode_needs_k_conditioning(skewed):
    with pytest.raises(ValueError, match="k_conditioning=true"):
        adaptive(skewed, k_conditioning=False)
    with pytest.raises(ValueError, match="k_source='soup'"):
        LitDiT(dit=DiTConfig(**SMALL), k_source="soup")  # type: ignore[arg-type]


def test_allocation_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="not a subset"):
        adaptive(write_allocation(tmp_path, [[0.5, 0.5]] * 4, grid=[4, 12]))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        adaptive(write_allocation(tmp_path, [[0.25] * 4] * 2))
    with pytest.raises(FileNotFoundError, match="vlt allocate"):
        adaptive(tmp_path / "elsewhere" / "allocation.json")


def latent_batch(k: torch.Tensor) -> LatentBatch:
    b = len(k)
    zeros = torch.zeros(b, dtype=torch.long)
    return LatentBatch(
        latent=torch.zeros(b, 32, 4), label=zeros, complexity=zeros, k=k, key=[str(i) for i in range(b)]
    )


def test_batches_must_hold_one_allocated_k(skewed):
    model = adaptive(skewed)
    assert model.training_k(latent_batch(torch.full((5,), 8))) == 8
    for bad in (torch.tensor([8, 8, 16]), torch.full((3,), -1)):
        with pytest.raises(ValueError, match=r"data\.init_args\.allocation"):
            batch_k(latent_batch(bad))
    assert model.generator.k_probs.shape == (4, 4) and "generator.k_probs" in model.state_dict()
    assert "generator.k_probs" in model._ddp_params_and_buffers_to_ignore


@pytest.mark.parametrize("budget", [6.0, 12.0, 20.0])
def test_choose_ks_meets_the_budget(skewed, budget):
    model = adaptive(skewed).generator
    labels = torch.arange(512) % 3
    ks = model.choose_ks(labels, budget, torch.Generator().manual_seed(0))
    assert ks.shape == (512,) and set(ks.tolist()) <= set(GRID)
    assert abs(ks.double().mean().item() - budget) < 0.5
    # the tilt keeps each class's preference: class 2 (large K) above class 0 (small K)
    assert ks[labels == 2].double().mean() > ks[labels == 0].double().mean() + 2
    cycle = LitDiT(dit=DiTConfig(**SMALL), ks=GRID).generator
    ks = cycle.choose_ks(labels, budget, torch.Generator().manual_seed(0))
    assert abs(ks.double().mean().item() - budget) < 0.5


def test_choose_ks_without_budget_follows_p_k_given_class(skewed):
    model = adaptive(skewed).generator
    ks = model.choose_ks(torch.zeros(400, dtype=torch.long), None, torch.Generator().manual_seed(1))
    counts = [(ks == k).sum().item() / 400 for k in GRID]
    assert np.allclose(counts, [0.7, 0.2, 0.1, 0.0], atol=0.01)
    unlabelled = model.choose_ks(torch.full((400,), -1), None, torch.Generator().manual_seed(1))
    assert (unlabelled == 32).sum().item() == pytest.approx(120, abs=4)  # the all-images row


def test_generate_adaptive_reassembles_in_order(skewed, monkeypatch):
    model = adaptive(skewed).generator

    def fake_generate(labels, k, **kwargs):  # an image that says which label and K made it
        return (labels.double() * 100 + k)[:, None, None, None].expand(-1, 3, 2, 2).float()

    monkeypatch.setattr(model, "generate", fake_generate)
    labels = torch.tensor([2, 0, 1, 2, 0, 0, 1, 2, 2, 1])
    images, ks = model.generate_adaptive(labels, budget=14.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (10, 3, 2, 2) and len(set(ks.tolist())) > 1
    assert torch.equal(images[:, 0, 0, 0], (labels * 100 + ks).float())


def cache_with_allocation(latents: Path, out: Path) -> dict[str, dict[str, int]]:
    """A view of the cache (symlinks) plus an allocation with K_i in {8, 32} by key parity."""
    out.mkdir()
    for f in latents.iterdir():
        os.symlink(f, out / f.name)
    ks, labels, per_split = {}, [], {}
    for split in ("train", "val"):
        samples = wds.WebDataset(sorted(map(str, latents.glob(f"{split}-*.tar"))), shardshuffle=False)
        keys, cls = zip(*[(s["__key__"], int(s["cls"])) for s in samples], strict=True)
        k = np.array([8 if i % 2 else 32 for i in range(len(keys))])
        ks[split], per_split[split] = (list(keys), k), dict(zip(keys, k.tolist(), strict=True))
        labels += cls
    all_k = torch.tensor(np.concatenate([ks[s][1] for s in ks]))
    probs = k_histogram(all_k, torch.tensor(labels), GRID, 10)
    meta = {"rule": "parity", "cost": "k", "budget": 20.0, "lambda": 0.0, "grid": GRID, "num_classes": 10}
    LatentCache(out).save_allocation(
        meta | {"p_k_given_class": probs.tolist(), "mean_k": {"train": 20.0}}, ks
    )
    return per_split


@pytest.mark.slow
def test_adaptive_fit_trains_at_the_batch_k_and_samples_at_a_budget(
    tiny_latents, tiny_tokenizer, tiny_vltnet, tiny_shards, tmp_path, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    cache = tmp_path / "cache"
    cache_with_allocation(tiny_latents, cache)
    runs = tiny_tokenizer.parents[2]  # shares the tokenizer run's cached real FID statistics
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/dit/tiny-adaptive.yaml"),
            f"--runs_dir={runs}",
            "--name=dit-adaptive",
            f"--latents={cache}",
            f"--model.init_args.tokenizer={tiny_tokenizer}",
            *TINY_DIT,
            *budget_overrides(tiny_vltnet, tiny_shards["val"]),
        ]
    )
    run = runs / "dit-adaptive"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    train_k = {e.value for e in acc.Scalars("train/k")}
    assert train_k <= {8.0, 32.0} and len(acc.Scalars("train/k")) == 6  # never the cycle's 16 or 4
    assert {"val/loss_adaptive", "val/loss@k4", "val/loss@k32"} <= set(acc.Tags()["scalars"])

    ckpt = run / "checkpoints" / "last.ckpt"
    assert LitDiT.load_from_checkpoint(ckpt).k_source == "data"
    model = vlt_load(str(ckpt))
    assert model.has_prior and model.dit.cfg.k_conditioning
    assert torch.allclose(model.k_probs[-1], torch.tensor([0.0, 0.5, 0.0, 0.5]))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    images, ks = model.generate_adaptive(
        labels, budget=20.0, steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (6, 3, 32, 32) and set(ks.tolist()) <= {8, 32}

    out = tmp_path / "samples"
    vlt(["sample", "--dit", str(ckpt), "--budget", "12", "--count", "8", "--steps", "2", "--out", str(out)])
    saved = np.load(out / "samples_budget12.npz")
    assert saved["arr_0"].shape == (8, 32, 32, 3) and saved["arr_0"].dtype == np.uint8
    assert saved["ks"].shape == (8,) and set(saved["ks"].tolist()) <= {8, 32}
    assert (out / "grid_budget12.png").is_file()
    assert "mean K 12" in capsys.readouterr().out
