"""Content-adaptive vs fixed K on the embedded data, end to end (tiny presets, CPU): `make experiment-adaptive`.

    .venv/bin/python scripts/experiment_adaptive.py [--out runs/experiment-adaptive] [--fresh]

Needs the stage-1 tokenizer and the stage-2 DiT of `make train-tokenizer` / `make train-dit` (the Makefile
target builds them when missing). Steps, each skipped when its output exists (--fresh redoes them):

1. `vlt cache-latents` of the synthetic shards with per-image PSNR curves at every K of the grid.
2. `vlt allocate` at mean budgets N/8, N/4, N/2 (equal mean K and equal mean K^2; search and the single-pass
   predictor): lambda solved on train, applied to val. Left at budget N/4, cost K, search for step 3.
3. `vlt fit -c conf/dit/tiny-adaptive.yaml`: a DiT with K conditioning on K-bucketed batches.
4. Token-budget evaluations (`TokenBudgetCallback`, the callback the configs use): stage 1 PSNR / rfid_proxy at
   every K and at each budget (per-image oracle allocation on the evaluated images); stage 2 gfid_proxy of the
   fixed DiT at every K and of the adaptive DiT at each budget, with mean K and FLOPs per image.
5. `results.md` (tables), `allocations.json`, and figures (`vlt curves`) in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLT = [sys.executable, "-m", "vlt.cli"]


def run(args: list[str]) -> None:
    print("$ vlt " + " ".join(args), flush=True)
    subprocess.run(VLT + args, check=True, cwd=ROOT)


def cache(tokenizer: str, latents: Path, fresh: bool) -> None:
    if (latents / "done-val-r0.json").exists() and (latents / "curves-val-r0.npz").exists() and not fresh:
        print(f"latent cache with PSNR curves found: {latents}")
        return
    for split in ("train", "val"):
        run(
            ["cache-latents", "--tokenizer", tokenizer, "--shards", f"data/synthetic/shards/{split}-*.tar",
             "--out", str(latents), "--split", split, "--overwrite", "true", "--distortion", "true"]
        )  # fmt: skip


def allocations(latents: Path, budgets: list[int]) -> list[dict]:
    """Allocate at every budget / cost / source; the last call (budget N/4, cost k, search) stays on disk."""
    results = []
    plan = [(b, c, s) for s in ("predictor", "search") for c in ("k2", "k") for b in budgets]
    plan.sort(key=lambda p: p[0] == budgets[1] and p[1] == "k" and p[2] == "search")
    for budget, cost, source in plan:
        run(
            ["allocate", "--cache", str(latents), "--budget", str(budget), "--cost", cost, "--source", source]
        )
        results.append(json.loads((latents / "allocation.json").read_text()))
    return results


def train_adaptive_dit(latents: Path, tokenizer: str, runs_dir: Path, fresh: bool) -> Path:
    ckpt = runs_dir / "dit-tiny-adaptive" / "checkpoints" / "last.ckpt"
    if ckpt.exists() and not fresh:
        print(f"adaptive DiT found: {ckpt}")
        return ckpt
    if fresh and ckpt.parent.parent.exists():
        shutil.rmtree(ckpt.parent.parent)
    run(
        ["fit", "-c", "conf/dit/tiny-adaptive.yaml", f"--runs_dir={runs_dir}", f"--latents={latents}",
         f"--model.init_args.tokenizer={tokenizer}"]
    )  # fmt: skip
    return ckpt


def evaluate(module, data, name: str, out: Path, **callback_args) -> list[dict]:
    """`trainer.validate` with a TokenBudgetCallback; returns the curve rows it wrote."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from vlt.callbacks import TokenBudgetCallback

    callback = TokenBudgetCallback(
        extractor="proxy",
        cache_dir=str(ROOT / "runs" / ".fid_cache"),
        dataset_id="synthetic-val",
        **callback_args,
    )
    if (out / name).exists():
        shutil.rmtree(out / name)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=TensorBoardLogger(out, name=name, version=""), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
    )  # fmt: skip
    trainer.validate(module, datamodule=data, verbose=False)
    return json.loads((out / name / "curves" / "budget_latest.json").read_text())["rows"]


def stage1(tokenizer: str, budgets: list[int], grid: list[int], out: Path, num_images: int) -> list[dict]:
    from vlt.data import WebDataModule
    from vlt.lit import LitTokenizer

    model = LitTokenizer.load_from_checkpoint(tokenizer, map_location="cpu")
    data = WebDataModule(
        val="data/synthetic/shards/val-*.tar", image_size=32, val_batch_size=256, num_workers=0
    )
    return evaluate(
        model, data, "stage1", out, ks=grid, metrics=["psnr", "rfid"], budgets=budgets,
        num_images=num_images, batch_size=256,
    )  # fmt: skip


def stage2(
    ckpt: Path, latents: Path, budgets: list[int] | None, name: str, out: Path, ks: list[int]
) -> list[dict]:
    from vlt.data import WebDataModule
    from vlt.lit import LitDiT

    model = LitDiT.load_from_checkpoint(str(ckpt), map_location="cpu")
    data = WebDataModule(kind="latents", val=str(latents / "val-*.tar"), val_batch_size=256, num_workers=0)
    return evaluate(
        model, data, name, out, ks=ks, metrics=["gfid"], cfg_scales=[1.5], budgets=budgets,
        num_images=256, batch_size=128, resolution=32,
    )  # fmt: skip


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(float(x), spec)


def report(
    rows1: list[dict], allocs: list[dict], fixed_dit: list[dict], adaptive_dit: list[dict], budgets
) -> str:
    def row(rows, mode, k):
        return next((r for r in rows if r.get("mode", "fixed") == mode and float(r["k"]) == float(k)), None)

    lines = ["# Content-adaptive vs fixed K (tiny presets, embedded synthetic val)", ""]
    lines += [
        "## Stage 1: reconstruction (per-image oracle allocation on the evaluated images)",
        "",
        "| budget K | fixed PSNR | adaptive PSNR (mean K) | adaptive @ equal K^2 PSNR (mean K, rms K) |"
        " fixed rfid_proxy | adaptive rfid_proxy | adaptive @ K^2 rfid_proxy |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in budgets:
        f, a, a2 = row(rows1, "fixed", b), row(rows1, "adaptive", b), row(rows1, "adaptive-k2", b)
        lines.append(
            f"| {b} | {fmt(f['psnr'])} | {fmt(a['psnr'])} ({fmt(a['tokens'])}) | {fmt(a2['psnr'])} "
            f"({fmt(a2['tokens'])}, {fmt(a2['k_rms'])}) | {fmt(f['rfid_proxy'], '.1f')} | "
            f"{fmt(a['rfid_proxy'], '.1f')} | {fmt(a2['rfid_proxy'], '.1f')} |"
        )
    lines += [
        "",
        "## Stage 1: `vlt allocate` (lambda solved on train, applied to val)",
        "",
        "| source | cost | budget | achieved mean K (val) | val PSNR adaptive | val PSNR fixed K=budget | gain dB |"
        " Spearman(K, complexity) | Spearman(K, PNG bytes) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in allocs:
        fixed = a.get("fixed_psnr", {}).get("val", {}).get(str(int(a["budget"])))
        adaptive = a.get("psnr", {}).get("val")
        gain = None if fixed is None or adaptive is None else adaptive - fixed
        rho = a.get("spearman", {}).get("val", {})
        lines.append(
            f"| {a.get('source')} | {a.get('cost')} | {a['budget']:g} | {fmt(a.get('mean_k', {}).get('val'))} | "
            f"{fmt(adaptive)} | {fmt(fixed)} | {fmt(gain, '+.2f')} | {fmt(rho.get('complexity'), '.3f')} | "
            f"{fmt(rho.get('png_bytes'), '.3f')} |"
        )
    predictor = [a for a in allocs if a.get("source") == "predictor" and a.get("predictor")]
    if predictor:
        lines += ["", "Single-pass predictor vs search (val): " + "; ".join(
            f"budget {a['budget']:g} {a['cost']}: " + ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in a["predictor"].items()
                                                                if isinstance(v, (int, float)))
            for a in predictor
        )]  # fmt: skip
    lines += [
        "",
        "## Stage 2: generation (gfid_proxy, w = 1.5, 256 samples; GFLOPs per image incl. decode)",
        "",
        "| budget K | fixed DiT at K=budget: gfid_proxy (GFLOPs) | adaptive DiT: gfid_proxy (mean K, rms K, GFLOPs) |",
        "|---:|---:|---:|",
    ]
    for b in budgets:
        f, a = row(fixed_dit, "fixed", b), row(adaptive_dit, "adaptive", b)
        fcol = next((c for c in (f or {}) if c.startswith("gfid")), None)
        acol = next((c for c in (a or {}) if c.startswith("gfid")), None)
        lines.append(
            f"| {b} | {fmt(f and f[fcol], '.1f')} ({fmt(f and float(f['flops']) / 1e9, '.2f')}) | "
            f"{fmt(a and a[acol], '.1f')} ({fmt(a and a['tokens'])}, {fmt(a and a['k_rms'])}, "
            f"{fmt(a and float(a['flops']) / 1e9, '.2f')}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", default="runs/tokenizer-tiny/checkpoints/last.ckpt")
    parser.add_argument("--dit", default="runs/dit-tiny/checkpoints/last.ckpt", help="the fixed-K DiT")
    parser.add_argument("--latents", default="data/latents/tokenizer-tiny-adaptive")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--out", default="runs/experiment-adaptive")
    parser.add_argument("--num_images", type=int, default=1000, help="stage-1 evaluation images")
    parser.add_argument("--fresh", action="store_true", help="redo every step")
    args = parser.parse_args()
    for path in (args.tokenizer, args.dit):
        if not (ROOT / path).exists():
            sys.exit(f"{path} is missing: run `make train-tokenizer` and `make train-dit` first")
    start = time.time()
    out, latents, runs_dir = ROOT / args.out, ROOT / args.latents, ROOT / args.runs_dir
    out.mkdir(parents=True, exist_ok=True)
    cache(args.tokenizer, latents, args.fresh)
    from vlt.models.merge_ops import MergeTable

    grid = MergeTable.load(latents / "merge_table.json").ks
    n = grid[-1]
    budgets = [n // 8, n // 4, n // 2]
    allocs = allocations(latents, budgets)
    (out / "allocations.json").write_text(json.dumps(allocs, indent=1))
    adaptive_ckpt = train_adaptive_dit(latents, args.tokenizer, runs_dir, args.fresh)
    rows1 = stage1(args.tokenizer, budgets, grid, out, args.num_images)
    fixed_dit = stage2(ROOT / args.dit, latents, None, "stage2-fixed", out, grid)
    adaptive_dit = stage2(adaptive_ckpt, latents, budgets, "stage2-adaptive", out, grid)
    table = report(rows1, allocs, fixed_dit, adaptive_dit, budgets)
    (out / "results.md").write_text(table)
    run(["curves", str(out / "stage1"), "--out", str(out / "stage1_psnr.png"), "--metric", "psnr"])
    run(
        [
            "curves",
            str(out / "stage2-fixed"),
            str(out / "stage2-adaptive"),
            "--out",
            str(out / "stage2_gfid.png"),
        ]
    )
    print(table)
    print(f"experiment-adaptive: {time.time() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
