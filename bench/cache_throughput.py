"""Throughput of the predict-loop tools: `vlt cache-latents` and `vlt sample`, images per second.

Letters: B batch, N slots, C channels, K tokens, G levels of the merge grid.

One table per device, rows at batch 1 / 64 / 256, on untrained models of the default (tiny) configs
(N = 32, C = 16, 32x32 images, K in {4, 8, 16, 32}):

- `cache step`: `LitCacher.predict_step` (encode + encode of the flipped image), and with curves
  (`+ curves`: G = 4 more decodes and a PNG size per image);
- `cache-latents`: the whole tool on 512 synthetic images (Lightning's loop, decoding of the image
  shards, tar writing, records), without curves;
- `sample step`: `LitSampler.predict_step` at K = 32 (`bench/sample_throughput.py`: 25 guided Euler
  steps, decode, uint8).

Each step time is the median of `--repeats` calls after a warm-up call of 2 images.

    python bench/cache_throughput.py                 # CPU, float32 (and CUDA in bf16 when present)
    python bench/cache_throughput.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sample_throughput  # the sampler's timing, shared

from vlt.data.builders import synthetic
from vlt.lit.cacher import LitCacher
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.stages import VariableLengthTokenizer, export
from vlt.tools.cache_latents import cache_latents

GRID = [4, 8, 16, 32]


def tokenizer() -> VariableLengthTokenizer:
    cfg = TokenizerConfig()
    return VariableLengthTokenizer(cfg, MergePattern.contiguous(cfg.n_slots, GRID)).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cache_step(lit: LitCacher, b: int, device: str, precision: str, repeats: int) -> float:
    """Seconds per batch of `b` images (median of `repeats`, after a warm-up call of 2 images)."""
    cast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    size = lit.tokenizer.cfg.image_size
    times = []
    with torch.inference_mode(), cast:
        for i in range(repeats + 1):
            n = b if i else 2
            batch = {"unit": 0, "last": False, "key": [str(j) for j in range(n)], "skipped": 0}
            batch |= {
                "shard_errors": 0,
                "notes": [],
                "image": torch.rand(n, 3, size, size, device=device) * 2 - 1,
            }
            batch |= {
                "label": torch.zeros(n, dtype=torch.long),
                "complexity": torch.zeros(n, dtype=torch.long),
            }
            sync(device)
            start = time.perf_counter()
            lit.predict_step(batch, 0)
            sync(device)
            if i:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_cache_tool(shards: str, tok: Path, out: Path, b: int, device: str, precision: str) -> float:
    """Seconds of `cache_latents`'s predict loop (the Trainer's set-up included, loading the model not),
    as its completion record says."""
    run = {
        "accelerator": "gpu" if device == "cuda" else "cpu",
        "precision": "bf16-mixed" if precision == "bf16" else "32-true",
    }
    os.environ["VLT_QUIET"] = "1"  # no progress lines or summary inside the table, nor Lightning's info
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        cache_latents(
            tokenizer=str(tok),
            shards=shards,
            out=str(out),
            batch_size=b,
            num_workers=1,
            distortion=False,
            **run,
        )
    finally:
        os.environ.pop("VLT_QUIET")
    return float(json.loads((out / "done-train-r0.json").read_text())["seconds"])


def table(device: str, precision: str, batches: list[int], repeats: int, images: int, tmp: Path) -> None:
    torch.manual_seed(0)
    tok = tokenizer()
    plain = LitCacher(tok, flip=True, grid=[]).to(device)
    curves = LitCacher(tok, flip=True, grid=GRID).to(device)
    sampler = sample_throughput.build(25).to(device)
    folder = export(tok, tmp / f"tok-{device}")
    shards = str(tmp / "shards/train-*.tar")
    print(f"\n{device}, {precision}: images per second (s per batch)")
    heads = ["cache step", "cache step + curves", "cache-latents", "sample step K=32"]
    print(f"{'batch':>6} {heads[0]:>18} {heads[1]:>20} {heads[2]:>16} {heads[3]:>18}")
    for b in batches:
        step = time_cache_step(plain, b, device, precision, repeats)
        step_curves = time_cache_step(curves, b, device, precision, repeats)
        tool = time_cache_tool(shards, folder, tmp / f"cache-{device}-{b}", b, device, precision)
        gen = sample_throughput.time_batch(sampler, b, 32, device, precision, repeats)
        cells = [f"{b / step:.0f} ({step:.4f})", f"{b / step_curves:.0f} ({step_curves:.4f})"]
        cells += [f"{images / tool:.0f} ({tool:.1f} s)" if tool > 0 else "-", f"{b / gen:.1f} ({gen:.4f})"]
        print(f"{b:>6} {cells[0]:>18} {cells[1]:>20} {cells[2]:>16} {cells[3]:>18}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda when present)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: fp32, bf16 on cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per batch size (median)")
    parser.add_argument("--images", type=int, default=512, help="images of the whole-tool rows")
    args = parser.parse_args()
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        synthetic(out=str(Path(tmp) / "shards"), n_train=args.images, n_val=1, shard_size=128, progress=False)
        for device in devices:
            precision = args.precision or ("bf16" if device == "cuda" else "fp32")
            table(device, precision, args.batches, args.repeats, args.images, Path(tmp))


if __name__ == "__main__":
    main()
