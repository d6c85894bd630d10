"""A real 2-process CPU DDP (gloo) `vlt fit` of the tiny tokenizer on shards, under a timeout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY_TOKENIZER

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_two_process_fit_on_shards(tmp_path, tiny_shards):
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
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6  # both ranks took exactly batches_per_epoch batches per epoch
    assert ckpt["vlt_stage"] == "tokenizer"
