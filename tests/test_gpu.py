"""The gpu tier (skipped without CUDA; `bench/gpu_check.sh` runs it): the whole tiny pipeline in bf16 on
one GPU, and a compiled FlexAttention DiT that trains."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, TINY_DIT, TINY_TOKENIZER, budget_overrides
from vlt.cli import main as vlt
from vlt.data.cache import LatentCache
from vlt.models.dit import DiT, DiTBlock, DiTConfig
from vlt.models.pattern import MergePattern
from vlt.nn.compile import compile_blocks
from vlt.objectives.flow import RectifiedFlow
from vlt.tools.cache_latents import cache_latents
from vlt.tools.evaluate import evaluate_samples
from vlt.tools.sample import sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)"),
]
GPU = ["-c", str(ROOT / "conf/trainer/gpu.yaml")]  # one GPU, bf16-mixed


def test_tokenizer_cache_dit_sample_eval_in_bf16(tmp_path, tiny_shards, tiny_vltnet):
    runs, latents = tmp_path / "runs", tmp_path / "latents"
    data = [f"--data.init_args.train={tiny_shards['train']}", f"--data.init_args.val={tiny_shards['val']}"]
    where = [f"--runs_dir={runs}"]
    vlt(
        [
            "fit",
            "-c",
            str(ROOT / "conf/tokenizer/tiny.yaml"),
            *GPU,
            *where,
            "--name=tok",
            *data,
            *TINY_TOKENIZER,
        ]
    )
    tok = runs / "tok" / "checkpoints" / "last.ckpt"
    for split in ("train", "val"):
        cache_latents(
            tokenizer=str(tok), shards=tiny_shards[split], out=str(latents), split=split, batch_size=64,
            num_workers=0, accelerator="gpu",
        )  # fmt: skip
    assert LatentCache(latents).meta("train")["precision"] == "bf16-mixed"  # the GPU default
    dit_args = [f"--latents={latents}", f"--model.init_args.tokenizer={tok}", *TINY_DIT]
    dit_args += budget_overrides(tiny_vltnet, tiny_shards["val"])
    vlt(["fit", "-c", str(ROOT / "conf/dit/tiny.yaml"), *GPU, *where, "--name=dit", *dit_args])
    dit = runs / "dit" / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples"
    written = sample(dit=str(dit), k=[4, 32], count=64, batch_size=32, out=str(out), accelerator="gpu")
    assert {p.name for p in written} >= {"samples_k4.npz", "samples_k32.npz"}
    evaluate_samples(
        str(out / "samples_k32.npz"), tiny_shards["val"], features="vltnet", weights=str(tiny_vltnet),
        out=str(tmp_path / "eval.json"), replicates=0,
    )  # fmt: skip
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert "fd_vltnet" in json.dumps(scores)


def test_a_compiled_flex_dit_trains_in_bf16_and_matches_sdpa():
    torch.manual_seed(0)
    cfg = DiTConfig(n_slots=64, channels=16, width=128, depth=2, heads=4, num_classes=10)
    sdpa = DiT(cfg).cuda()
    flex = DiT(DiTConfig(**{**vars(cfg), "attention": "flex"})).cuda()
    flex.load_state_dict(sdpa.state_dict())
    compile_blocks(flex, (DiTBlock,))
    pattern = MergePattern.contiguous(64, [16, 64])
    gbar, sizes = pattern.gbar(16).cuda(), pattern.sizes(16).cuda()
    x, t, y = (
        torch.randn(8, 16, 16, device="cuda"),
        torch.rand(8, device="cuda"),
        torch.arange(8, device="cuda"),
    )
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        torch.testing.assert_close(
            flex(x, t, y, gbar, sizes).float(), sdpa(x, t, y, gbar, sizes).float(), atol=5e-2, rtol=5e-2
        )
    opt = torch.optim.AdamW(flex.parameters(), lr=1e-3)
    flow, losses = RectifiedFlow(), []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow.training_losses(flex, x, y, gbar, sizes)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
