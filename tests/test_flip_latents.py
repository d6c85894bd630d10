"""Flipped latents: the cache stores the encoding of each horizontally flipped image; stage-2 training
draws it 50/50 with the original, validation always reads the original."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import webdataset as wds

from vlt import load as vlt_load
from vlt.data.cache import LatentCache
from vlt.data.datamodule import WebDataModule

pytestmark = pytest.mark.slow


def _cached(latents) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for sample in wds.WebDataset(
        [str(f) for f in LatentCache(latents).shard_files("val")], shardshuffle=False
    ):
        pair = [np.load(io.BytesIO(sample[name])) for name in ("latent.npy", "latent_flip.npy")]
        out[sample["__key__"]] = (pair[0], pair[1])
    return out


def test_flipped_latents_are_the_encodings_of_flipped_images(tiny_latents, tiny_tokenizer, tiny_shards):
    tok = vlt_load(str(tiny_tokenizer), part="tokenizer").eval()
    cached = _cached(tiny_latents)
    data = WebDataModule(
        val=tiny_shards["val"], image_size=tok.cfg.image_size, val_batch_size=16, num_workers=0
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        z = tok.encode(batch.image)  # (B, N, C)
        z_flip = tok.encode(batch.image.flip(-1))  # (B, N, C)
    for i, key in enumerate(batch.key):
        plain, flipped = cached[key]
        torch.testing.assert_close(torch.from_numpy(plain), z[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(flipped), z_flip[i], atol=1e-5, rtol=1e-5)
        assert not np.allclose(plain, flipped)  # the tokenizer is not flip-invariant: the test can fail


def test_training_draws_flipped_latents_half_the_time_validation_never(tiny_latents):
    cached = _cached(tiny_latents)
    root = LatentCache(tiny_latents)
    data = WebDataModule(
        kind="latents", train=root.shards("val"), val=root.shards("val"), batch_size=16, val_batch_size=16,
        batches_per_epoch=16, num_workers=0, seed=0,
    )  # fmt: skip
    data.setup("fit")
    picks = []
    for batch in data.train_dataloader():
        for key, latent in zip(batch.key, batch.latent, strict=True):
            plain, flipped = cached[key]
            is_flip = np.array_equal(latent.numpy(), flipped)
            assert is_flip or np.array_equal(latent.numpy(), plain)
            picks.append(is_flip)
    assert len(picks) == 256 and 0.35 < np.mean(picks) < 0.65
    for batch in data.val_dataloader():
        for key, latent in zip(batch.key, batch.latent, strict=True):
            assert np.array_equal(latent.numpy(), cached[key][0])
