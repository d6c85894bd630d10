"""Sampling throughput of `vlt sample`'s predict step: images per second at batch 1 / 64 / 256.

Letters: B batch, N slots, C channels, K tokens.

Times `LitSampler.predict_step` (per-image noise, every ODE step with guidance, decode, uint8) on an
untrained generator of the default (tiny) DiT and tokenizer configs, after one warm-up call, and the
share of the per-image noise generators (`indexed_noise`) in it. Lightning's loop adds a few ms per
batch on top; part files add one npz write per batch.

    python bench/sample_throughput.py                                 # CPU, float32
    python bench/sample_throughput.py --device cuda --precision bf16  # GPU (also run by default when present)
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from vlt.lit.sampler import LitSampler
from vlt.models.dit import DiTConfig
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec, indexed_noise
from vlt.stages import LatentGenerator


def build(steps: int) -> LitSampler:
    """The default (tiny) configs: N = 32 slots, C = 16, 32x32 images, K in {4, 8, 16, 32}."""
    tok, dit = TokenizerConfig(), DiTConfig()
    pattern = MergePattern.contiguous(dit.n_slots, [4, 8, 16, 32])
    gen = LatentGenerator(dit, pattern, tokenizer=tok, flow=FlowSpec(sample_steps=steps))
    return LitSampler(gen, labels=list(range(dit.num_classes)), seed=0)


def time_batch(lit: LitSampler, b: int, k: int, device: str, precision: str, repeats: int) -> float:
    """Seconds per batch of `b` images at K = k (median of `repeats`, after a warm-up call of 2 images)."""
    cast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), cast:
        for i in range(repeats + 1):
            batch = {"k": k, "batch": 0, "index": torch.arange(b if i else 2)}
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            lit.predict_step(batch, 0)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def table(device: str, precision: str, batches: list[int], k: int, steps: int, repeats: int) -> None:
    lit = build(steps).to(device)
    n, c = lit.generator.dit.cfg.n_slots, lit.generator.dit.cfg.channels
    print(f"\n{device}, {precision}, K={k}, {steps} steps (guided: 2 DiT calls per step)")
    print(f"{'batch':>6} {'s/batch':>9} {'img/s':>9} {'noise %':>8}")
    for b in batches:
        seconds = time_batch(lit, b, k, device, precision, repeats)
        start = time.perf_counter()
        indexed_noise(0, range(b), k, n, c)
        noise = time.perf_counter() - start
        print(f"{b:>6} {seconds:>9.4f} {b / seconds:>9.1f} {100 * noise / seconds:>7.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda when present)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: fp32, bf16 on cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per batch size (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        precision = args.precision or ("bf16" if device == "cuda" else "fp32")
        table(device, precision, args.batches, args.k, args.steps, args.repeats)


if __name__ == "__main__":
    main()
