"""DiT cost vs token count K: training step time and sampling speed next to the analytic FLOPs ratio.

Letters: B batch, N latent slots, K merged tokens, C channels.

For each preset and K in {N/8, N/4, N/2, N} this measures one training step (forward + backward +
AdamW on the rectified-flow loss) and 25-step Euler sampling, interleaving the K values round by
round so that drift in machine load hits every K alike. Ratios are taken within one run.

    python bench/dit_scaling.py                                   # CPU: tiny (N=32) and s (N=256)
    python bench/dit_scaling.py --presets b --device cuda --dtype bf16 --batch 64 --sample_batch 64

Targets: time(K)/time(N) within 1.3x of FLOPs(K)/FLOPs(N); sampling img/s at K=N/8 >= 3.1x that
at K=N/2 (the paper's XL: 6.12 vs 1.95 img/s at K=32 vs 128, decoding included).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from vlt.models.dit import DiTBlock
from vlt.models.merge_ops import merge
from vlt.models.pattern import MergePattern
from vlt.models.registry import create
from vlt.nn.compile import compile_blocks
from vlt.objectives.flow import RectifiedFlow

# Dense bf16 peak (tensor cores, no sparsity) in TFLOP/s by a name `torch.cuda.get_device_name()` contains;
# the first match wins (H200 before H100: "H100" is not in "H200", but keep the order specific first).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
PEAK_ENV = "VLT_PEAK_TFLOPS"

# Per-preset (train batch, sampling batch); override with --batch/--sample_batch. Small batches make
# the tiny model's time per-op overhead and AdamW's fixed cost, not FLOPs, so tiny needs a large one.
BATCHES = {"tiny": (256, 256), "s": (8, 16), "b": (4, 8), "l": (2, 4), "xl": (2, 4)}


def peak_tflops(device: str, override: float | None = None) -> tuple[float | None, str]:
    """The device's dense bf16 peak in TFLOP/s and where it came from: --peak_tflops, the
    VLT_PEAK_TFLOPS environment variable, the table above by the CUDA device's name, else None."""
    if override:
        return override, "--peak_tflops"
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]), PEAK_ENV
    if device != "cuda":
        return None, "no peak for CPUs"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"table: {name}"
    return None, f"{name} is not in the table: set {PEAK_ENV}"


def autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_preset(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = create("dit", name, attention=args.attention).to(args.device)
    if args.compile:
        compile_blocks(model, (DiTBlock,))
    cfg, flow = model.cfg, RectifiedFlow()
    n, c = cfg.n_slots, cfg.channels
    ks = [n // 8, n // 4, n // 2, n]
    table = MergePattern.contiguous(n, ks)
    batch, sample_batch = BATCHES.get(name, (4, 4))
    batch, sample_batch = args.batch or batch, args.sample_batch or sample_batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dev = args.device
    data = {}
    for k in ks:
        gbar, sizes = table.gbar(k).to(dev), table.sizes(k).to(dev)
        data[k] = (gbar, sizes, merge(torch.randn(batch, n, c, device=dev), gbar))  # x1: (B, K, C)
    y = torch.randint(0, cfg.num_classes, (max(batch, sample_batch),), device=dev)

    def train_step(k: int) -> None:
        gbar, sizes, x1 = data[k]
        with autocast(dev, args.dtype):
            loss = flow.training_losses(model, x1, y[:batch], gbar, sizes)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample(k: int, steps: int = args.sample_steps) -> None:
        gbar, sizes, _ = data[k]
        with autocast(dev, args.dtype):
            flow.sample(model, y=y[:sample_batch], gbar=gbar, sizes=sizes, steps=steps)

    step_t = {k: [] for k in ks}
    samp_t = {k: [] for k in ks}
    model.train()
    for k in ks:  # warm-up: allocator, kernels, AdamW state
        train_step(k)
    for _ in range(args.repeats):
        for k in ks:
            step_t[k].append(timed(lambda k=k: train_step(k), dev))
    for k in ks:  # warm-up: one step is enough to reach the no-grad kernels
        sample(k, steps=1)
    for _ in range(args.sample_repeats):
        for k in ks:
            samp_t[k].append(timed(lambda k=k: sample(k), dev))
    report(name, model, ks, batch, sample_batch, step_t, samp_t, args)


def report(name, model, ks, batch, sample_batch, step_t, samp_t, args) -> None:
    n = model.cfg.n_slots
    step = {k: statistics.median(v) for k, v in step_t.items()}
    ips = {k: sample_batch / statistics.median(v) for k, v in samp_t.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    head = f"DiT-{name}: N={n}, C={model.cfg.channels}, {params:.1f}M params, {args.device} {args.dtype}"
    head += f", {model.cfg.attention} attention" + (", compiled" if args.compile else "")
    print(f"\n### {head} ({torch.get_num_threads()} threads)")
    print(f"train batch {batch}, sampling batch {sample_batch} x {args.sample_steps} Euler steps, medians\n")
    peak, source = peak_tflops(args.device, args.peak_tflops)
    mfu = peak is not None
    print(f"MFU against a dense bf16 peak of {peak} TFLOP/s ({source})" if mfu else f"no MFU: {source}")
    head = "| K | FLOPs/img (G) | FLOPs ratio | step (ms) | step ratio | step/FLOPs ratio | sample img/s |"
    print(head + (" train MFU | sample MFU |" if mfu else ""))
    print("|---" * (9 if mfu else 7) + "|")
    for k in ks:
        fr = model.flops(k) / model.flops(n)
        sr = step[k] / step[n]
        row = (
            f"| {k} | {model.flops(k) / 1e9:.3f} | {fr:.3f} | {1e3 * step[k]:.1f} | {sr:.3f} | {sr / fr:.2f} "
        )
        row += f"| {ips[k]:.3g} |"
        if mfu:
            train_mfu = 3 * model.flops(k) * batch / step[k] / (peak * 1e12)  # backward ~ 2x forward
            samp_mfu = model.flops(k) * args.sample_steps * ips[k] / (peak * 1e12)
            row += f" {100 * train_mfu:.1f}% | {100 * samp_mfu:.1f}% |"
        print(row)
    worst = max(step[k] / step[n] / (model.flops(k) / model.flops(n)) for k in ks)
    speed = ips[n // 8] / ips[n // 2]
    verdict = {True: "ok", False: "MISS"}
    print(f"\nstep ratio / FLOPs ratio, worst K: {worst:.2f} (target <= 1.3): {verdict[worst <= 1.3]}")
    print(f"sampling img/s K=N/8 vs K=N/2: {speed:.2f}x (target >= 3.1): {verdict[speed >= 3.1]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "s"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    p.add_argument("--preset", dest="presets", nargs="+", help="alias of --presets")
    p.add_argument("--batch", type=int, default=0, help="training batch (0: per-preset default)")
    p.add_argument("--sample_batch", type=int, default=0, help="sampling batch (0: per-preset default)")
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per K")
    p.add_argument("--sample_repeats", type=int, default=1, help="timed sampling runs per K")
    p.add_argument(
        "--attention", choices=["sdpa", "flex"], default="sdpa", help="proportional-attention kernel"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (warm-up compiles)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help=f"dense bf16 peak (default: {PEAK_ENV}, else by GPU name)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for name in args.presets:
        bench_preset(name, args)


if __name__ == "__main__":
    main()
