"""Stage 1 end to end: `vlt fit` of every merge mode, checkpoint round trip, merge table export."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import ROOT, TINY_TOKENIZER
from vlt import load as vlt_load
from vlt.cli import main as vlt
from vlt.lit import LitTokenizer
from vlt.models.pattern import MergePattern
from vlt.specs import MergeSpec, OptimSpec

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["nested", "tome", "fixed"])
def test_fit_each_baseline(tmp_path, tiny_shards, mode):
    extra = ["--model.init_args.merge.fixed_k=8"] if mode == "fixed" else []
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/tokenizer/tiny.yaml"),
            f"--runs_dir={tmp_path}",
            f"--name={mode}",
            f"--data.init_args.train={tiny_shards['train']}",
            f"--data.init_args.val={tiny_shards['val']}",
            f"--model.init_args.merge.mode={mode}",
            "--model.init_args.merge.full_k_fraction=0.0",
            *TINY_TOKENIZER,
            *extra,
        ]
    )
    ckpt = tmp_path / mode / "checkpoints" / "last.ckpt"
    model = LitTokenizer.load_from_checkpoint(ckpt).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for k in model.val_ks:
        assert model.reconstruct(x, k).shape == x.shape


def test_lgm_run_outputs_and_checkpoint_round_trip(tiny_tokenizer, tiny_shards):
    run_dir = tiny_tokenizer.parent.parent
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard events in the run directory"
    table = MergePattern.load(run_dir / "pattern.json")
    assert table.ks == [4, 8, 16, 32] and table.nested()

    a = LitTokenizer.load_from_checkpoint(tiny_tokenizer).eval()
    b = vlt_load(str(tiny_tokenizer))  # the stage object, without Lightning's loader
    # the pattern of the loaded stage is the one the checkpoint's (EMA) weights give
    assert b.pattern.equal(a.pattern()) and b.ks == [4, 8, 16, 32]
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for k in (4, 16, 32):
            assert torch.allclose(a.reconstruct(x, k), b.reconstruct(x, k), atol=1e-6)
            tokens = b.tokenize(x, k)
            assert tokens.tokens.shape == (4, k, b.cfg.channels) and tokens.sizes.sum() == 32
            assert torch.allclose(b.detokenize(tokens.tokens), a.reconstruct(x, k), atol=1e-5)


def test_validation_logs_psnr_per_k(tiny_tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_tokenizer.parent.parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"val/psnr@k{k}" for k in (4, 8, 16, 32)} <= tags
    assert {"val/slot_cos", "val/merged_cos@k8", "train/loss", "train/k"} <= tags
    images = acc.Tags()["images"]
    assert any("reconstructions" in t for t in images) and any("merge_pattern" in t for t in images)


def test_resolved_config_is_saved_beside_the_checkpoints(tiny_tokenizer):
    import yaml

    config = yaml.safe_load((tiny_tokenizer.parent.parent / "config.yaml").read_text())
    assert config["model"]["class_path"] == "vlt.lit.LitTokenizer"
    assert config["model"]["init_args"]["tokenizer"]["width"] == 32  # the command-line override, resolved
    hparams = LitTokenizer.load_from_checkpoint(tiny_tokenizer).hparams
    assert hparams["tokenizer"].width == 32 and hparams["merge"].grid == [4, 8, 16, 32]


def test_full_k_fraction_runs_the_first_steps_at_k_equal_n():
    torch.manual_seed(0)
    model = LitTokenizer(merge=MergeSpec(grid=[4, 8], full_k_fraction=0.25))
    ks = [model.training_k(step, 100) for step in range(100)]
    assert ks[:25] == [32] * 25 and set(ks[25:]) == {4, 8}
    assert set(model.training_k(0, -1) for _ in range(20)) == {4, 8}  # max_steps unset: no warm phase


def test_lr_schedule_warms_up_linearly_and_decays_by_cosine_to_the_floor():
    spec = OptimSpec(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    opt = spec.build([torch.nn.Parameter(torch.zeros(1))], total_steps=110)
    sched = opt["lr_scheduler"]["scheduler"]
    assert opt["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(120):
        lrs.append(opt["optimizer"].param_groups[0]["lr"])
        opt["optimizer"].step()
        sched.step()
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lrs[110:] == pytest.approx([1e-4] * 10)  # the floor after total_steps
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
