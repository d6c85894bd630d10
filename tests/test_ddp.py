"""A real 2-process CPU DDP (gloo) `vlt fit` of the tiny tokenizer on shards, under a timeout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY_TOKENIZER

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def _fit(tmp_path, tiny_shards, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    cmd = [
        sys.executable,
        "-m",
        "vlt.cli",
        "fit",
        "-c",
        str(ROOT / "conf/tokenizer/tiny.yaml"),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        f"--runs_dir={tmp_path}",
        "--name=ddp",
        f"--data.init_args.train={tiny_shards['train']}",
        f"--data.init_args.val={tiny_shards['val']}",
        *TINY_TOKENIZER,
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_two_process_fit_on_shards(tmp_path, tiny_shards):
    proc = _fit(tmp_path, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6  # both ranks took exactly batches_per_epoch batches per epoch
    assert ckpt["vlt_stage"] == "tokenizer"


def test_two_process_fit_with_the_discriminator(tmp_path, tiny_shards):
    """The GAN terms under DDP: the adaptive weight's autograd.grad inside the DDP forward, every head in
    the graph before disc_start, and no module buffers (validation batch counts differ between ranks)."""
    from tests.test_adversarial import write_backbone

    disc = write_backbone(tmp_path / "dino.pt")
    proc = _fit(
        tmp_path, tiny_shards, "--model.init_args.loss.adversarial=0.5",
        f"--model.init_args.loss.disc_weights={disc}", "--model.init_args.loss.disc_size=tiny",
        "--model.init_args.loss.disc_image_size=32", "--model.init_args.loss.disc_start=2",
        "--model.init_args.loss.lecam=0.001", "--model.init_args.loss.disc_adaptive=true",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["current_model_state"]["adversarial.lecam._extra_state"].abs().min() > 0
