"""Stage 2 end to end: latent cache round trip, statistics, `vlt fit` of the DiT, sampling."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.conftest import ROOT, TINY_DIT
from vlt import load as vlt_load
from vlt.cli import main as vlt
from vlt.data.cache import LatentCache
from vlt.lit import LitDiT, LitTokenizer
from vlt.tools.cache_latents import cache_latents

pytestmark = pytest.mark.slow


def test_latent_shards_round_trip(tiny_latents, tiny_tokenizer, tiny_shards):
    tok = LitTokenizer.load_from_checkpoint(tiny_tokenizer).eval()
    cached = {
        s["__key__"]: s for s in wds.WebDataset(str(next(tiny_latents.glob("val-*.tar"))), shardshuffle=False)
    }
    images = {
        s["__key__"]: s
        for s in wds.WebDataset(
            sorted(__import__("glob").glob(tiny_shards["val"])), shardshuffle=False
        ).decode("rgb")
    }
    assert set(cached) == set(images) and len(cached) == 64
    key = sorted(cached)[0]
    latent = np.load(__import__("io").BytesIO(cached[key]["latent.npy"]))
    img = torch.tensor(images[key]["png"]).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        assert np.allclose(latent, tok.encode(img.float())[0].numpy(), atol=1e-4)
    assert int(cached[key]["cls"]) == int(images[key]["cls"])


def test_stats_match_the_cached_latents(tiny_latents):
    mean, std = LatentCache(tiny_latents).stats()
    z = torch.cat(
        [
            torch.tensor(np.load(__import__("io").BytesIO(s["latent.npy"])))[None]
            for s in wds.WebDataset(sorted(map(str, tiny_latents.glob("train-*.tar"))), shardshuffle=False)
        ]
    )
    assert torch.allclose(mean, z.mean(dim=(0, 1)), atol=1e-4)
    assert torch.allclose(std, z.std(dim=(0, 1), unbiased=False), atol=1e-4)


def test_finished_cache_is_not_overwritten(tiny_latents, tiny_tokenizer, tiny_shards):
    with pytest.raises(FileExistsError, match="--overwrite"):
        cache_latents(
            tokenizer=str(tiny_tokenizer), shards=tiny_shards["val"], out=str(tiny_latents), split="val"
        )


def test_normalisation_is_applied_and_inverted(tiny_dit):
    gen = vlt_load(str(tiny_dit))
    assert not torch.allclose(gen.latent_std, torch.ones_like(gen.latent_std))
    z = torch.randn(3, 32, gen.dit.cfg.channels)
    assert torch.allclose(gen.denormalise(gen.normalise(z)), z, atol=1e-5)


def test_dit_fit_checkpoint_and_sampling(tiny_dit, tmp_path):
    a = LitDiT.load_from_checkpoint(tiny_dit).generator.eval()
    b = vlt_load(str(tiny_dit))
    assert a.ks == b.ks == [4, 8, 16, 32]
    labels = torch.tensor([0, 1, 2])
    for k in (4, 32):
        x = a.generate(labels, k, steps=2, generator=torch.Generator().manual_seed(1))
        y = b.generate(labels, k, steps=2, generator=torch.Generator().manual_seed(1))
        assert x.shape == (3, 3, 32, 32) and torch.equal(x, y)
    vlt(
        [
            "sample",
            "--dit",
            str(tiny_dit),
            "--k",
            "[4,16]",
            "--count",
            "4",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    arr = np.load(tmp_path / "samples_k4.npz")["arr_0"]
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8
    assert (tmp_path / "grid_k16.png").is_file()


def test_stage2_checkpoint_and_export_sample_without_cache_or_stage1(tmp_path, tiny_shards, tiny_tokenizer):
    """Self-contained: delete the latent cache and the stage-1 checkpoint, then load the stage-2
    checkpoint and its export and sample the same images as before the deletion."""
    tok_ckpt = tmp_path / "tok.ckpt"
    shutil.copy(tiny_tokenizer, tok_ckpt)
    cache = tmp_path / "latents"
    for split in ("train", "val"):
        cache_latents(tokenizer=str(tok_ckpt), shards=tiny_shards[split], out=str(cache), split=split,
                      batch_size=64, num_workers=0, distortion=False)  # fmt: skip
    vlt(
        ["fit", "-c", str(ROOT / "conf/dit/tiny.yaml"), f"--runs_dir={tmp_path}", "--name=dit",
         f"--latents={cache}", f"--model.init_args.tokenizer={tok_ckpt}", "--trainer.callbacks=[]",
         "--trainer.max_steps=3",
         *TINY_DIT[:4], "--trainer.log_every_n_steps=1", "--data.init_args.batches_per_epoch=3",
         "--data.init_args.num_workers=0", "--trainer.val_check_interval=3"]
    )  # fmt: skip
    (ckpt,) = (tmp_path / "dit" / "checkpoints").glob("*.ckpt")  # Lightning's default checkpoint
    labels = torch.tensor([0, 3, 7, 9])

    def samples(path) -> dict[int, torch.Tensor]:
        gen = vlt_load(str(path))
        return {
            k: gen.generate(labels, k, steps=3, generator=torch.Generator().manual_seed(5)) for k in gen.ks
        }

    before = samples(ckpt)
    vlt(["export", str(ckpt), str(tmp_path / "export")])
    shutil.rmtree(cache)
    tok_ckpt.unlink()
    after_ckpt, after_export = samples(ckpt), samples(tmp_path / "export" / "generator")
    lit = LitDiT.load_from_checkpoint(ckpt)  # the Lightning loader needs no file either
    assert lit.generator.ks == sorted(before) == [4, 8, 16, 32]
    for k, images in before.items():
        assert torch.equal(images, after_ckpt[k]) and torch.equal(images, after_export[k])
    code = "import sys, vlt; vlt.load(sys.argv[1]); assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "export" / "generator")], check=True)


def test_cache_mismatch_is_a_clear_error(tmp_path, tiny_latents, tiny_tokenizer):
    with pytest.raises(ValueError, match="expects N=32, C=8"):
        vlt(
            [
                "fit",
                "-c",
                str(ROOT / "conf/dit/tiny.yaml"),
                f"--runs_dir={tmp_path}",
                f"--latents={tiny_latents}",
                f"--model.init_args.tokenizer={tiny_tokenizer}",
                "--model.init_args.dit.channels=8",
                *TINY_DIT,
            ]
        )


def test_val_loss_per_k_logged(tiny_dit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_dit.parent.parent), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {f"val/loss@k{k}" for k in (4, 8, 16, 32)} <= set(acc.Tags()["scalars"])
    assert any("samples" in t for t in acc.Tags()["images"])
    assert {f"budget/gfid_proxy@k{k}_w1.5" for k in (4, 32)} <= set(acc.Tags()["scalars"])
    assert (tiny_dit.parents[1] / "curves" / "budget_latest.json").is_file()
