"""Shared fixtures: tiny embedded shard sets and tiny trained stage checkpoints, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlt.cli import main as vlt

ROOT = Path(__file__).resolve().parents[1]

# A stage fit small enough for a unit-test budget: the real configs, the real CLI, tiny overrides.
TINY_TOKENIZER = [
    "--model.init_args.tokenizer.width=32",
    "--model.init_args.tokenizer.heads=2",
    "--model.init_args.tokenizer.enc_depth=1",
    "--model.init_args.tokenizer.dec_depth=1",
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.batches_per_epoch=3",
    "--data.init_args.batch_size=8",
    "--data.init_args.val_batch_size=32",
    "--data.init_args.num_workers=0",
]


@pytest.fixture(autouse=True)
def _not_a_slurm_job(monkeypatch):
    """Tests outside the slurm tier must not look like SLURM runs to Lightning."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict[str, str]:
    """Synthetic shards (256 train / 64 val) as glob patterns."""
    from vlt.data.builders import synthetic

    root = tmp_path_factory.mktemp("shards")
    synthetic(out=str(root), n_train=256, n_val=64, shard_size=64, progress=False)
    return {"train": str(root / "train-*.tar"), "val": str(root / "val-*.tar"), "root": str(root)}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tiny_shards) -> Path:
    """A LitTokenizer checkpoint from a 6-step `vlt fit` of conf/tokenizer/tiny.yaml (tiny overrides)."""
    runs = tmp_path_factory.mktemp("runs")
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/tokenizer/tiny.yaml"),
            f"--runs_dir={runs}",
            "--name=tok",
            f"--data.init_args.train={tiny_shards['train']}",
            f"--data.init_args.val={tiny_shards['val']}",
            *TINY_TOKENIZER,
        ]
    )
    return runs / "tok" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory, tiny_shards, tiny_tokenizer) -> Path:
    """A latent cache (train + val) of the tiny tokenizer."""
    from vlt.tools.cache_latents import cache_latents

    out = tmp_path_factory.mktemp("latents")
    for split in ("train", "val"):
        cache_latents(
            tokenizer=str(tiny_tokenizer),
            shards=tiny_shards[split],
            out=str(out),
            split=split,
            batch_size=64,
            num_workers=0,
        )
    return out


TINY_DIT = [
    "--model.init_args.dit.width=32",
    "--model.init_args.dit.depth=1",
    "--model.init_args.dit.heads=2",
    "--model.init_args.flow.sample_steps=2",
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.batches_per_epoch=3",
    "--data.init_args.batch_size=16",
    "--data.init_args.num_workers=0",
]


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory, tiny_latents, tiny_tokenizer, tiny_vltnet, tiny_shards):
    runs = tiny_tokenizer.parents[2]  # shares the tokenizer run's cached real FID statistics
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/dit/tiny.yaml"),
            f"--runs_dir={runs}",
            "--name=dit",
            f"--latents={tiny_latents}",
            f"--model.init_args.tokenizer={tiny_tokenizer}",
            *TINY_DIT,
            "--model.init_args.flow.split_prob=0.5",  # coarse-to-fine training states on half the samples
            *budget_overrides(tiny_vltnet, tiny_shards["val"]),
        ]
    )
    return runs / "dit" / "checkpoints" / "last.ckpt"


# A vltnet small enough to train in seconds: the real recipe and code, tiny sizes.
TINY_VLTNET = {"widths": (4, 8, 8, 8), "dim": 4, "steps": 4, "batch_size": 8}
TINY_VLTNET |= {"n_synthetic_pool": 24, "n_photo_pool": 8}


@pytest.fixture(scope="session")
def tiny_vltnet(tmp_path_factory) -> Path:
    """A saved vltnet file (`vlt.metrics.features`) from a few steps on a tiny pool."""
    from vlt.metrics.features import VltNetConfig, save_vltnet, train_vltnet

    net = train_vltnet(VltNetConfig(**TINY_VLTNET), log_every=0)
    return save_vltnet(net, tmp_path_factory.mktemp("features"))


def budget_overrides(vltnet: Path, real_shards: str) -> list[str]:
    """Point the tiny configs' budget callback (the last callback) at a tiny vltnet and test shards."""
    return [
        f"--trainer.callbacks.init_args.feature_net={vltnet}",
        f"--trainer.callbacks.init_args.real_shards={real_shards}",
    ]
