"""Untrusted checkpoints: no code runs from a file; wrong stages and damaged files are named."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from vlt import runs
from vlt.checkpoints import UnsafeCheckpointError, WrongStageError, checkpoint_stage, load_checkpoint
from vlt.lit import LitDiT, LitJoint, LitTokenizer, cli
from vlt.models.tokenizer import TokenizerConfig
from vlt.specs import MergeSpec
from vlt.stages import load

TINY = TokenizerConfig(
    width=32, heads=2, enc_depth=1, dec_depth=1, image_size=16, patch_size=4, n_slots=8, channels=4
)


class Payload:
    """Unpickling this runs `os.system`: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_stage(module: L.LightningModule, path: Path) -> Path:
    """A stage checkpoint the way Lightning and the joint export write it."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**ckpt, "pytorch-lightning_version": L.__version__}, path)
    return path


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory) -> Path:
    module = LitTokenizer(tokenizer=TINY, merge=MergeSpec(grid=[2, 4, 8], embed_dim=8))
    return save_stage(module, tmp_path_factory.mktemp("tok") / "tok.ckpt")


def test_malicious_pickle_is_refused_by_every_loader(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload(marker)}}, evil, pickle_protocol=2)
    with pytest.raises(UnsafeCheckpointError, match=r"refused.*weights_only"):
        load_checkpoint(evil, config_key="model.init_args.tokenizer")
    with pytest.raises(UnsafeCheckpointError):
        load(str(evil))  # vlt.load: every tool's loader (sample, cache-latents, export)
    with pytest.raises(UnsafeCheckpointError):
        LitDiT.resolve_sources({"tokenizer": str(evil)})  # stage 2 reads its tokenizer's config
    with pytest.raises(UnsafeCheckpointError):
        LitJoint.resolve_sources({"init_from_dit": str(evil)})  # the joint fine-tune's init files
    with pytest.raises(UnsafeCheckpointError, match="init_from_dit"):
        cli.check_checkpoint_args({"init_args": {"init_from_dit": str(evil)}})
    assert not marker.exists(), "code ran from the checkpoint"


def test_project_checkpoints_load_with_weights_only(tokenizer_ckpt):
    ckpt = load_checkpoint(tokenizer_ckpt, expect="tokenizer")
    assert checkpoint_stage(ckpt) == "tokenizer" and isinstance(
        ckpt["hyper_parameters"]["tokenizer"], TokenizerConfig
    )


def test_wrong_stage_is_refused_naming_the_config_key(tokenizer_ckpt):
    with pytest.raises(WrongStageError, match=r"model\.init_args\.init_from_dit=.*stage 'tokenizer'.*'dit'"):
        cli.check_checkpoint_args({"init_args": {"init_from_dit": str(tokenizer_ckpt)}})
    with pytest.raises(WrongStageError, match="--ckpt_path"):
        cli.check_ckpt_path(str(tokenizer_ckpt), object.__new__(type("LitDiT", (), {})))
    cli.check_checkpoint_args({"init_args": {"init_from_tokenizer": str(tokenizer_ckpt)}})


def test_ckpt_path_last_falls_back_to_the_newest_loadable(tmp_path, tokenizer_ckpt, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = run / "checkpoints" / "step2.ckpt"
    good.write_bytes(tokenizer_ckpt.read_bytes())
    damaged = run / "hpc_ckpt_1.ckpt"
    damaged.write_bytes(tokenizer_ckpt.read_bytes()[:5000])  # a write cut short by a kill
    os.utime(good, ns=(10**18, 10**18))
    os.utime(damaged, ns=(2 * 10**18, 2 * 10**18))
    with caplog.at_level("WARNING"):
        assert runs.resume_path(run, ckpt_path="last", env={}) == str(good)
    assert "hpc_ckpt_1.ckpt" in caplog.text and "falling back" in caplog.text
    good.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"no checkpoint in .* loads"):
        runs.resume_path(run, ckpt_path="last", env={})
