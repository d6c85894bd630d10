"""Cost of learned global merging inside a tokenizer training step.

Times, per training step: drawing the noisy merge pattern (similarities + one average-linkage tree +
the cut), the straight-through merge + unmerge, and the whole step (encode, merge, decode, loss,
backward, AdamW). Prints a markdown table; the target is merging <= 5% of the step.

    .venv/bin/python bench/merging.py                      # tiny (N=32), tiny with N=64, s (N=256)
    .venv/bin/python bench/merging.py --device cuda --batch_s 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from vlt.models import Merger, create
from vlt.models.merge_ops import column_normalise, merge, unmerge
from vlt.models.merging import hierarchy, straight_through
from vlt.objectives import ReconLoss


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of fn in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def bench(preset: str, batch: int, repeats: int, device: torch.device, **overrides: object) -> dict:
    torch.manual_seed(0)
    tok = create("tokenizer", preset, **overrides).to(device).train()
    n, size = tok.cfg.n_slots, tok.cfg.image_size
    blocks = 4 if n >= 64 else 1
    grid = [k for k in (4, 8, 16, 32, 48, 64, 96, 128, 196, 256) if k <= n]
    merger = Merger(mode="lgm", n_slots=n, grid=grid, embed_dim=64 if n < 256 else 256, blocks=blocks)
    merger = merger.to(device).train()
    k = n // 4
    loss_fn = ReconLoss()
    opt = torch.optim.AdamW([*tok.parameters(), *merger.parameters()], lr=1e-4)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    z = torch.randn(batch, n, tok.cfg.channels, device=device)
    gen = torch.Generator().manual_seed(0)

    def pattern() -> object:
        return hierarchy(merger.e, [k], noise=merger.noise, blocks=blocks, generator=gen)

    assign = pattern()[k]

    def merge_unmerge() -> object:
        gamma = straight_through(merger.e, assign, k, merger.tau)
        return unmerge(merge(z, column_normalise(gamma)), gamma)

    def step() -> None:
        enc = tok.encode(x)
        out = merger(enc.z, k, generator=gen)
        parts = loss_fn(x, tok.decode(out.z_hat), kl=enc.kl, align=merger.alignment_loss(enc.z))
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()

    t_pattern = _time(pattern, repeats * 5, device)
    t_merge = _time(merge_unmerge, repeats * 5, device)
    t_step = _time(step, repeats, device)
    return {"preset": preset, "N": n, "K": k, "batch": batch, "image": size, "pattern": t_pattern,
            "merge": t_merge, "step": t_step}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_tiny", type=int, default=32)
    parser.add_argument("--batch_s", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_s", action="store_true", help="only the tiny rows")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [
        bench("tiny", args.batch_tiny, args.repeats, device),
        bench("tiny", args.batch_tiny, args.repeats, device, n_slots=64),
    ]
    if not args.skip_s:
        rows.append(bench("s", args.batch_s, args.repeats, device))
    print(f"device: {device}, threads: {torch.get_num_threads()}\n")
    print("| preset | N | K | batch x image | pattern ms | merge+unmerge ms | step ms | merging % of step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = 100 * (r["pattern"] + r["merge"]) / r["step"]
        print(
            f"| {r['preset']} | {r['N']} | {r['K']} | {r['batch']} x {r['image']}^2 | {r['pattern']:.2f} "
            f"| {r['merge']:.2f} | {r['step']:.1f} | {share:.1f}% |"
        )


if __name__ == "__main__":
    main()
