"""vltnet: annotated rendering equals the shard renderer, deterministic builds, hash-checked loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_VLTNET
from vlt.data import synthetic
from vlt.metrics import features_data
from vlt.metrics.features import (
    LATEST,
    VltNetConfig,
    load_vltnet,
    resolve,
    save_vltnet,
    train_vltnet,
)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_annotated_render_is_the_shard_renderer(seed):
    image, covered = features_data.render_annotated(np.random.default_rng([seed, 2, 5]))
    plain = synthetic.render(np.random.default_rng([seed, 2, 5]))
    assert np.array_equal(image.pixels, plain.pixels) and image.shapes == plain.shapes
    assert covered.shape == (32, 32) and (covered > 0).any() == (plain.complexity > 0)


def test_pool_targets_and_flips():
    pool = features_data.build_pool(6, 4, seed=0)
    assert len(pool) == 10 and (pool.hue[:6] >= 0).all() and (pool.hue[6:] == -1).all()
    assert (pool.source[:6] == 0).all() and (pool.source[6:] >= 1).all()
    assert np.isnan(pool.scale[:6]).all() and np.isfinite(pool.scale[6:]).all()
    assert (pool.kinds[:6].sum(1) == pool.count[:6]).all()
    index = np.arange(10)
    yes, no = np.ones(10, bool), np.zeros(10, bool)
    batch = features_data.flip(pool, index, yes, no)
    assert np.array_equal(batch["images"], pool.images[:, :, ::-1])
    cells = pool.cells.reshape(-1, 4, 4)[:, :, ::-1].reshape(10, -1)
    assert np.allclose(batch["cells"][:6], cells[:6])
    upright = features_data.flip(pool, index, no, yes)["images"]  # photos never flip vertically
    assert np.array_equal(upright[6:], pool.images[6:]) and np.array_equal(upright[:6], pool.images[:6, ::-1])


def test_build_is_deterministic_and_named_by_its_hash(tmp_path):
    config = VltNetConfig(**TINY_VLTNET)
    first = save_vltnet(train_vltnet(config, log_every=0), tmp_path / "a")
    second = save_vltnet(train_vltnet(config, log_every=0), tmp_path / "b")
    assert first.name == second.name and first.name.startswith("vltnet-")
    other = save_vltnet(train_vltnet(VltNetConfig(**{**TINY_VLTNET, "seed": 1}), log_every=0), tmp_path / "c")
    assert other.name != first.name
    assert (tmp_path / "a" / LATEST).read_text().strip() == first.name and resolve(tmp_path / "a") == first


def test_loaded_net_gives_standardised_features_and_hue_logits(tiny_vltnet):
    net = load_vltnet(tiny_vltnet.parent)  # the folder resolves through LATEST
    assert net.name == tiny_vltnet.stem and not any(p.requires_grad for p in net.parameters())
    pool = features_data.build_pool(24, 8, seed=0)  # the tiny net's own training pool
    images = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        feats, logits = net(images), net.classify(images)
    assert feats.shape == (32, 4) and logits.shape == (32, 10)
    assert torch.allclose(feats.mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(feats.std(0), torch.ones(4), atol=1e-3)
    assert net(torch.nn.functional.interpolate(images, size=64)).shape == feats.shape  # any size is resized


def test_damaged_or_missing_files_are_clear_errors(tiny_vltnet, tmp_path):
    blob = torch.load(tiny_vltnet, weights_only=True)
    blob["state_dict"]["shift"] = blob["state_dict"]["shift"] + 1
    bad = tmp_path / tiny_vltnet.name
    torch.save(blob, bad)
    with pytest.raises(ValueError, match="damaged or renamed"):
        load_vltnet(bad)
    with pytest.raises(ValueError, match="vlt features --out"):
        load_vltnet(tmp_path / "nowhere")
