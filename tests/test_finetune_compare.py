"""Stage 3 against its fair baseline: a seeded joint run is the same run twice, and the stage-2 baseline
resumes the very checkpoint the joint run starts from, for the joint's number of optimizer steps."""

from __future__ import annotations

import argparse
import importlib.util
import os

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, budget_overrides
from tests.test_lit_joint import TINY_JOINT
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


@pytest.mark.slow
def test_a_joint_training_seed_reruns_the_joint_config_at_its_seed(
    tmp_path, tiny_shards, tiny_tokenizer, tiny_dit, tiny_vltnet
):
    """Training seed t > 0 is the joint run's own saved config again at seed t, with no in-fit
    evaluation; it is reused until the seed-0 run is newer."""
    import yaml

    script = _script()
    args = argparse.Namespace(out=str(tmp_path / "compare"), fresh=False)
    joint = tmp_path / "runs" / "joint"
    script.fit(joint, ROOT / "conf/joint/tiny.yaml", [
        f"--model.init_args.init_from_tokenizer={tiny_tokenizer}",
        f"--model.init_args.init_from_dit={tiny_dit}",
        f"--data.init_args.train={tiny_shards['train']}", f"--data.init_args.val={tiny_shards['val']}",
        *TINY_JOINT, *budget_overrides(tiny_vltnet, tiny_shards["val"]),
        "--trainer.callbacks.init_args.num_images=16", "--trainer.callbacks.init_args.ks=[4,32]",
    ], saved=False)  # fmt: skip
    assert script.joint_seed(args, joint, 0) == joint / "export" / "generator"
    export = script.joint_seed(args, joint, 1)
    run = export.parents[1]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["seed_everything"] == 1 and run == tmp_path / "compare" / "runs" / "joint-seed1"
    assert not any("TokenBudget" in c["class_path"] for c in saved["trainer"]["callbacks"])
    assert (joint / "curves").is_dir() and not (run / "curves").exists()  # no in-fit evaluation
    first, other = (load_file(p / "model.safetensors") for p in (joint / "export" / "generator", export))
    assert first.keys() == other.keys() and not all(torch.equal(first[k], other[k]) for k in first)
    when = script.stamp(export)
    assert script.joint_seed(args, joint, 1) == export and script.stamp(export) == when  # reused
    os.utime(joint / "checkpoints" / "last.ckpt")  # a newer seed-0 run: seed 1 is run again
    assert script.joint_seed(args, joint, 1) == export and script.stamp(export) > when


def test_after_over_training_seeds_is_compared_through_its_seed_means():
    """One run against one: paired seed by seed. Several training runs against one run: the interval is
    over the runs' means, each paired with the other generator's mean over the same noise seeds."""
    from vlt.metrics.intervals import paired, t_interval

    script = _script()

    def rows(per_seed_fd):  # an evaluation per noise seed: one row per K
        return [[{"k": k, "gfd_vltnet": fd + k} for k in script.KS] for fd in per_seed_fd]

    before, after = (
        [rows([5.0, 6.0, 7.0])],
        [rows([4.0, 5.5, 6.1]), rows([4.2, 5.0, 6.2]), rows([3.9, 5.1, 6.6])],
    )
    v_before, v_after = script.values(before, 4, "gfd_vltnet"), script.values(after, 4, "gfd_vltnet")
    assert v_before == [[9.0, 10.0, 11.0]] and len(v_after) == 3
    one = script.versus(v_after[:1], v_before)
    d, half, p = paired([8.0, 9.5, 10.1], [9.0, 10.0, 11.0])
    assert one == f"{d:+.3f} ± {half:.3f} (p={p:.2g}){' *' if p < 0.05 else ''}"
    run_means = [sum(x) / 3 for x in v_after]
    d, half, p = paired(run_means, [10.0] * 3)
    assert script.versus(v_after, v_before) == f"{d:+.3f} ± {half:.3f} (p={p:.2g}){' *' if p < 0.05 else ''}"
    e = t_interval(run_means)
    assert script.cell(v_after) == f"{e.mean:.3f} ± {e.half:.3f}"
    assert script.versus(v_after[:1], [[1.0, 2.0]]) == "-"  # unequal noise seeds: nothing to pair


def test_study_variants_are_name_then_overrides(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("finetune_study", ROOT / "scripts" / "finetune_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    argv = ["finetune_study.py", "--variant", "lr=--model.init_args.part_lr.dit=5e-4 --trainer.max_steps=9"]
    monkeypatch.setattr("sys.argv", argv)
    assert study.parse().variant == [("lr", "--model.init_args.part_lr.dit=5e-4 --trainer.max_steps=9")]
    bad_variants = {"align": "e.g.", "=--trainer.max_steps=9": "e.g.", "default=--x": "names the joint"}
    for bad, says in bad_variants.items():
        monkeypatch.setattr("sys.argv", ["finetune_study.py", "--variant", bad])
        with pytest.raises(SystemExit):
            study.parse()
        assert says in capsys.readouterr().err
