"""Proportional attention kernels: the float-mask SDPA path, no mask (equal sizes) and FlexAttention.

Letters: B batch, K tokens, D width, H heads.

For each K, one `vlt.nn.attention.Attention` layer over (B, K, D) tokens that merge N = 2K slots
unevenly (sizes 1, 2, 3, so the log m_j bias is real), timed as

- `mask`: SDPA with the float key mask (on CUDA the memory-efficient kernel at best; no flash);
- `no mask`: SDPA without a mask, what equal sizes now get (K = N, nested dropout, fixed K): flash on CUDA;
- `flex`: FlexAttention with the bias in `score_mod` (compiled and fused on CUDA; unfused on CPU).

Forward only on CPU (FlexAttention has no CPU backward); forward + backward on CUDA. The median of
`--repeats` calls after two warm-up calls; the flex column on CUDA pays its compile in the warm-up.

    python bench/attention.py                                    # CPU, float32
    python bench/attention.py --device cuda --dtype bf16 --ks 256 1024 4096 --batch 32 --width 768
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from vlt.nn.attention import Attention, flex_available, size_bias


def uneven_sizes(k: int) -> torch.Tensor:
    """(K,) sizes 1, 2, 3, 1, 2, 3, ... (2K slots): a bias that is not constant."""
    return (1 + torch.arange(k) % 3).float()


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(layer: Attention, x: torch.Tensor, bias, backward: bool) -> None:
    if backward:
        layer(x, bias).sum().backward()
        return
    with torch.no_grad():
        layer(x, bias)


def row(k: int, args: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    backward = args.device == "cuda"
    x = torch.randn(args.batch, k, args.width, device=args.device, requires_grad=backward)
    bias = size_bias(uneven_sizes(k).to(args.device))
    sdpa = Attention(args.width, args.heads, qk_norm=True).to(args.device)
    cells = []
    cast = (
        torch.autocast(args.device, dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    with cast:
        cells.append(timed(lambda: run(sdpa, x, bias, backward), args.device, args.repeats))
        cells.append(timed(lambda: run(sdpa, x, None, backward), args.device, args.repeats))
        if flex_available():
            flex = Attention(args.width, args.heads, qk_norm=True, kernel="flex").to(args.device)
            flex.load_state_dict(sdpa.state_dict())
            cells.append(timed(lambda: run(flex, x, bias, backward), args.device, args.repeats))
    return [f"{1e3 * s:.2f}" for s in cells] + (["-"] if len(cells) == 2 else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    what = "forward + backward" if args.device == "cuda" else "forward"
    shape = f"batch {args.batch}, width {args.width}, {args.heads} heads"
    print(f"{args.device}, {args.dtype}, {shape}: ms per {what}")
    print(f"{'K':>6} {'mask':>10} {'no mask':>10} {'flex':>10} {'mask/no mask':>13}")
    for k in args.ks:
        mask, plain, flex = row(k, args)
        print(f"{k:>6} {mask:>10} {plain:>10} {flex:>10} {float(mask) / float(plain):>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
