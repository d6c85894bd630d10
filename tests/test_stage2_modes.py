"""Stage 2 for every stage-1 mode with a generator-side pattern (nested dropout, fixed K), end to end:
tokenizer fit, cache, DiT fit with token-budget curves, sampling at each K; ToMe is refused at setup."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.conftest import ROOT, TINY_DIT, TINY_TOKENIZER, budget_overrides
from vlt import load as vlt_load
from vlt.cli import main as vlt
from vlt.tools.cache_latents import cache_latents

pytestmark = pytest.mark.slow


def _tokenizer(runs, shards, mode: str):
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/tokenizer/tiny.yaml"),
            f"--runs_dir={runs}",
            f"--name=tok-{mode}",
            f"--data.init_args.train={shards['train']}",
            f"--data.init_args.val={shards['val']}",
            f"--model.init_args.merge.mode={mode}",
            "--model.init_args.merge.fixed_k=8",
            "--model.init_args.merge.full_k_fraction=0.0",
            *TINY_TOKENIZER,
        ]
    )
    return runs / f"tok-{mode}" / "checkpoints" / "last.ckpt"


def _cache(tmp_path, shards, ckpt):
    out = tmp_path / "latents"
    for split in ("train", "val"):
        cache_latents(tokenizer=str(ckpt), shards=shards[split], out=str(out), split=split, num_workers=0)
    return out


@pytest.mark.parametrize(("mode", "ks"), [("nested", [4, 8, 16, 32]), ("fixed", [8])])
def test_stage2_end_to_end_per_mode(tmp_path, tiny_shards, tiny_vltnet, mode, ks):
    ckpt = _tokenizer(tmp_path, tiny_shards, mode)
    latents = _cache(tmp_path, tiny_shards, ckpt)
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/dit/tiny.yaml"),
            f"--runs_dir={tmp_path}",
            f"--name=dit-{mode}",
            f"--latents={latents}",
            f"--model.init_args.tokenizer={ckpt}",
            f"--trainer.callbacks.init_args.ks={ks}",
            *budget_overrides(tiny_vltnet, tiny_shards["val"]),
            *TINY_DIT,
        ]
    )
    gen = vlt_load(str(tmp_path / f"dit-{mode}" / "checkpoints" / "last.ckpt"))
    assert gen.ks == ks and gen.pattern.kind == mode
    tok = vlt_load(str(ckpt))
    for k in ks:
        assert gen.pattern.subset([k]).equal(tok.pattern.subset([k]))
        images = gen.generate(torch.tensor([0, 1]), k, steps=2, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    if mode == "nested":  # sizes 1: the first K slots, each its own position
        assert gen.pattern.sizes(4).tolist() == [1.0] * 4
        assert gen.pattern.assignment(4).tolist() == [0, 1, 2, 3] + [-1] * 28
    with open(tmp_path / f"dit-{mode}" / "curves" / "budget.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(float(r["k"])) for r in rows}) == ks


def test_a_per_image_tokenizer_is_refused_at_setup(tmp_path, tiny_shards):
    ckpt = _tokenizer(tmp_path, tiny_shards, "tome")
    latents = _cache(tmp_path, tiny_shards, ckpt)
    with pytest.raises(FileNotFoundError, match=r"per image.*cannot know such a pattern"):
        vlt(
            [
                "fit",
                "-c",
                str(ROOT / "conf/dit/tiny.yaml"),
                f"--runs_dir={tmp_path}",
                "--name=dit-tome",
                f"--latents={latents}",
                f"--model.init_args.tokenizer={ckpt}",
                *TINY_DIT,
            ]
        )
