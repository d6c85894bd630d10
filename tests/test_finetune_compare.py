"""Stage 3 against its fair baseline: a seeded joint run is the same run twice, and the stage-2 baseline
resumes the very checkpoint the joint run starts from, for the joint's number of optimizer steps."""

from __future__ import annotations

import argparse
import importlib.util

import lightning as L
import pytest
import torch

from tests.conftest import ROOT
from vlt.data import WebDataModule
from vlt.lit import LitJoint
from vlt.specs import JointSpec


def _joint_fit(tokenizer, dit, shards: dict, seed: int, root) -> dict[str, torch.Tensor]:
    L.seed_everything(seed)
    model = LitJoint.from_checkpoints(str(tokenizer), str(dit), joint=JointSpec(projector_hidden=32))
    data = WebDataModule(
        train=shards["train"], val=shards["val"], batch_size=8, batches_per_epoch=3, num_workers=0
    )
    trainer = L.Trainer(
        max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=root,  # its export lands there
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_a_seeded_joint_run_is_reproducible(tmp_path, tiny_tokenizer, tiny_dit, tiny_shards):
    first, again = (_joint_fit(tiny_tokenizer, tiny_dit, tiny_shards, 0, tmp_path / str(i)) for i in range(2))
    other = _joint_fit(tiny_tokenizer, tiny_dit, tiny_shards, 1, tmp_path / "other")
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed: the same run
    assert not all(torch.equal(first[k], other[k]) for k in first)  # another seed: another run


def _script():
    spec = importlib.util.spec_from_file_location(
        "finetune_compare", ROOT / "scripts" / "finetune_compare.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_baseline_resumes_the_start_for_the_same_steps(tmp_path, tiny_dit):
    script = _script()
    args = argparse.Namespace(out=str(tmp_path), dit_config=None, fresh=False)
    start = torch.load(tiny_dit, map_location="cpu", weights_only=False)
    ckpt = script.longer(args, "plus2", tiny_dit, 2)
    done = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert done["global_step"] == start["global_step"] + 2
    assert done["hyper_parameters"]["dit"] == start["hyper_parameters"]["dit"]
    assert ckpt.parents[1] == tmp_path / "runs" / "plus2"  # its own run directory
    assert not (tiny_dit.parents[1] / "plus2").exists()
    seconds, steps = script.train_seconds(ckpt.parents[1])
    assert seconds > 0 and steps >= 1  # the step time the equal-time baseline is sized by
    assert script.longer(args, "plus2", tiny_dit, 2) == ckpt  # reused, not trained again
