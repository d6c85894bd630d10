"""Content-adaptive vs fixed K on the embedded data, end to end (tiny, CPU): `make experiment-adaptive`.

    .venv/bin/python scripts/experiment_adaptive.py [--out runs/experiment-adaptive] [--fresh]

Needs the stage-1 tokenizer and the stage-2 DiT of `make train-tokenizer` / `make train-dit` (the Makefile
target builds them when missing). Steps, each skipped when its output exists (--fresh redoes them):

1. `vlt cache-latents` of the synthetic shards with per-image PSNR curves at every K of the grid.
2. `vlt allocate` at mean budgets N/8, N/4, N/2 (equal mean K and equal mean K^2; search and the single-pass
   predictor): lambda solved on train, applied to val. Left at budget N/4, cost K, search for step 3.
3. `vlt fit -c conf/dit/tiny-adaptive.yaml`: a DiT with K conditioning on K-bucketed batches.
4. Token-budget evaluations (`TokenBudgetCallback`, as in the configs): stage 1 PSNR / rfid_proxy at
   every K and at each budget (per-image oracle allocation on the evaluated images); stage 2 gfid_proxy of the
   fixed DiT at every K and of the adaptive DiT at each budget, with mean K and FLOPs per image.
5. `results.md` (tables), `allocations.json`, and figures (`vlt curves`) in --out.
"""

from __future__ import annotations

import argparse
import functools
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
            [
                "cache-latents",
                "--tokenizer",
                tokenizer,
                "--shards",
                f"data/synthetic/shards/{split}-*.tar",
                "--out",
                str(latents),
                "--split",
                split,
                "--overwrite",
                "true",
                "--distortion",
                "true",
            ]
        )


def allocations(latents: Path, budgets: list[int], distortion: str) -> list[dict]:
    """`vlt allocate` at every budget, cost, distortion and source; the run the DiT trains on comes last
    (budget N/4, cost k, search, `distortion`) and stays on disk."""
    plan = [(b, c, d, "search") for d in ("neg_psnr", "mse") for c in ("k", "k2") for b in budgets]
    plan += [(b, "k", distortion, "predictor") for b in budgets]
    plan.sort(key=lambda p: p == (budgets[1], "k", distortion, "search"))
    results = []
    for budget, cost, dist, source in plan:
        run(
            [
                "allocate",
                "--cache",
                str(latents),
                "--budget",
                str(budget),
                "--cost",
                cost,
                "--distortion",
                dist,
                "--source",
                source,
            ]
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
        [
            "fit",
            "-c",
            "conf/dit/tiny-adaptive.yaml",
            f"--runs_dir={runs_dir}",
            f"--latents={latents}",
            f"--model.init_args.tokenizer={tokenizer}",
        ]
    )
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
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(out, name=name, version=""),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=1,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    return json.loads((out / name / "curves" / "budget_latest.json").read_text())["rows"]


def stage1(tokenizer: str, budgets: list[int], grid: list[int], out: Path, num_images: int, distortion: str):
    from vlt.data import WebDataModule
    from vlt.lit import LitTokenizer

    model = LitTokenizer.load_from_checkpoint(tokenizer, map_location="cpu")
    data = WebDataModule(
        val="data/synthetic/shards/val-*.tar", image_size=32, val_batch_size=256, num_workers=0
    )
    return evaluate(
        model,
        data,
        f"stage1-{distortion}",
        out,
        ks=grid,
        metrics=["psnr", "rfid"],
        budgets=budgets,
        num_images=num_images,
        batch_size=256,
        budget_distortion=distortion,
    )


def stage2(
    ckpt: Path, latents: Path, budgets: list[int] | None, name: str, out: Path, ks: list[int], seeds: int
) -> list[list[dict]]:
    """gfid_proxy rows of one DiT for each noise seed (the proxy FID of a few hundred samples moves by
    several points between seeds, so the table reports mean and spread)."""
    from vlt.data import WebDataModule
    from vlt.lit import LitDiT

    model = LitDiT.load_from_checkpoint(str(ckpt), map_location="cpu")
    # The same allocation as the model (Lightning refuses differing hparams of the same name).
    allocation = model.hparams.get("allocation")
    data = WebDataModule(
        kind="latents",
        val=str(latents / "val-*.tar"),
        val_batch_size=512,
        num_workers=0,
        allocation=allocation,
    )
    return [
        evaluate(
            model,
            data,
            f"{name}-seed{seed}",
            out,
            ks=ks,
            metrics=["gfid"],
            cfg_scales=[1.5],
            budgets=budgets,
            num_images=512,
            batch_size=128,
            resolution=32,
            seed=seed,
        )
        for seed in range(seeds)
    ]


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or x == "" else format(float(x), spec)


def find(rows: list[dict], mode: str, k: float) -> dict:
    return next((r for r in rows if r.get("mode", "fixed") == mode and float(r["k"]) == float(k)), {})


def metrics(row: dict) -> str:
    return f"{fmt(row.get('psnr'))} / {fmt(row.get('psnr_mse'))} / {fmt(row.get('rfid_proxy'), '.1f')}"


def stage1_table(rows: dict[str, list[dict]], budgets: list[int]) -> list[str]:
    lines = [
        "## Stage 1: reconstruction at equal mean K and equal mean K^2 (oracle allocation on the val images)",
        "",
        "PSNR = mean of per-image PSNR; pooled = PSNR of the mean squared error; rFID: proxy extractor.",
        "",
        "| distortion | budget | fixed K=budget: PSNR / pooled / rfid_proxy | adaptive, mean K = budget: "
        "mean K: PSNR / pooled / rfid_proxy | adaptive, mean K^2 = budget^2: mean K, rms K: PSNR / pooled / "
        "rfid_proxy |",
        "|---|---:|---|---|---|",
    ]
    for distortion, table in rows.items():
        for b in budgets:
            f, a, a2 = find(table, "fixed", b), find(table, "adaptive", b), find(table, "adaptive-k2", b)
            metrics = lambda r: (
                f"{fmt(r.get('psnr'))} / {fmt(r.get('psnr_mse'))} / {fmt(r.get('rfid_proxy'), '.1f')}"
            )
            lines.append(
                f"| {distortion} | {b} | {metrics(f)} | {fmt(a.get('tokens'))}: {metrics(a)} | "
                f"{fmt(a2.get('tokens'))}, {fmt(a2.get('k_rms'))}: {metrics(a2)} |"
            )
    return lines


def _val(allocation: dict, key: str):
    return (allocation.get(key) or {}).get("val")


def allocate_table(allocs: list[dict]) -> list[str]:
    lines = [
        "## Stage 1: `vlt allocate` (lambda solved on train, applied to val)",
        "",
        "| source | distortion | cost | budget | val mean K (rms K) | val PSNR adaptive / fixed at the "
        "achieved "
        "mean cost | pooled adaptive / fixed K=budget | Spearman K vs complexity, PNG bytes |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for a in allocs:
        val = functools.partial(_val, a)
        b = int(a["budget"])
        rho = val("spearman") or {}
        rms = (a.get("mean_cost") or {}).get("val") if a["cost"] == "k2" else None
        lines.append(
            f"| {a['source']} | {a['distortion']} | {a['cost']} | {b} | {fmt(val('mean_k'))}"
            f"{f' ({fmt(rms)})' if rms else ''} | {fmt(val('psnr'))} / {fmt(val('fixed_at_achieved'))} | "
            f"{fmt(val('pooled_psnr'))} / {fmt((val('fixed_pooled_psnr') or {}).get(str(b)))} | "
            f"{fmt(rho.get('complexity'), '.2f')}, {fmt(rho.get('png_bytes'), '.2f')} |"
        )
    predictor = [a for a in allocs if a["source"] == "predictor" and a.get("predictor")]
    for a in predictor:
        numbers = ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in a["predictor"].items() if isinstance(v, float))
        lines.append(f"\nPredictor at budget {a['budget']:g} ({a['distortion']}): {numbers}")
    return lines


def spread(runs: list[list[dict]], mode: str, k: int) -> tuple[str, dict]:
    """'mean ± std' of gfid_proxy over seeds at (mode, k), and the first seed's row (tokens, FLOPs)."""
    rows = [find(rows, mode, k) for rows in runs]
    values = [next(v for c, v in r.items() if c.startswith("gfid")) for r in rows if r]
    if not values:
        return "-", {}
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}", rows[0]


def stage2_table(fixed: list[list[dict]], adaptive: list[list[dict]], budgets: list[int]) -> list[str]:
    lines = [
        f"## Stage 2: generation (gfid_proxy, w = 1.5, 512 samples, mean ± std over {len(fixed)} noise "
        "seeds; GFLOPs per image incl. the decode)",
        "",
        "| budget | fixed-K DiT at K = budget: gfid_proxy (GFLOPs) | adaptive DiT, K_i ~ p(K class) tilted "
        "to the budget: gfid_proxy (mean K, rms K, GFLOPs) | adaptive DiT at fixed K = budget |",
        "|---:|---|---|---|",
    ]
    for b in budgets:
        (f, frow), (a, arow), (af, _) = (
            spread(fixed, "fixed", b), spread(adaptive, "adaptive", b), spread(adaptive, "fixed", b)
        )  # fmt: skip
        gflops = lambda row: fmt(float(row["flops"]) / 1e9 if row else None)
        lines.append(
            f"| {b} | {f} ({gflops(frow)}) | {a} ({fmt(arow.get('tokens'))}, {fmt(arow.get('k_rms'))}, "
            f"{gflops(arow)}) | {af} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", default="runs/tokenizer-tiny/checkpoints/last.ckpt")
    parser.add_argument("--dit", default="runs/dit-tiny/checkpoints/last.ckpt", help="the fixed-K DiT")
    parser.add_argument("--latents", default="data/latents/tokenizer-tiny-adaptive")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--out", default="runs/experiment-adaptive")
    parser.add_argument("--num_images", type=int, default=512, help="stage-1 evaluation images (val has 512)")
    parser.add_argument(
        "--distortion", default="mse", choices=["mse", "neg_psnr"], help="what the DiT's allocation minimises"
    )
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds of the stage-2 evaluations")
    parser.add_argument("--fresh", action="store_true", help="redo every step")
    args = parser.parse_args()
    for path in (args.tokenizer, args.dit):
        if not (ROOT / path).exists():
            sys.exit(f"{path} is missing: run `make train-tokenizer` and `make train-dit` first")
    start = time.time()
    out, latents, runs_dir = ROOT / args.out, ROOT / args.latents, ROOT / args.runs_dir
    out.mkdir(parents=True, exist_ok=True)
    cache(args.tokenizer, latents, args.fresh)
    from vlt.data.cache import LatentCache

    grid = LatentCache(latents).pattern().ks
    n = grid[-1]
    budgets = [n // 8, n // 4, n // 2]
    done = out / "allocations.json"
    if done.exists() and not args.fresh:
        allocs = json.loads(done.read_text())
        print(f"allocations found: {done} (the DiT's allocation is the last one, on disk in {latents})")
    else:
        allocs = allocations(latents, budgets, args.distortion)
        done.write_text(json.dumps(allocs, indent=1))
    adaptive_ckpt = train_adaptive_dit(latents, args.tokenizer, runs_dir, args.fresh)
    rows1 = {d: stage1(args.tokenizer, budgets, grid, out, args.num_images, d) for d in ("neg_psnr", "mse")}
    fixed_dit = stage2(ROOT / args.dit, latents, None, "stage2-fixed", out, grid, args.seeds)
    adaptive_dit = stage2(adaptive_ckpt, latents, budgets, "stage2-adaptive", out, grid, args.seeds)
    lines = ["# Content-adaptive vs fixed K (tiny presets, embedded synthetic val)", ""]
    lines += [*stage1_table(rows1, budgets), "", *allocate_table(allocs), ""]
    lines += stage2_table(fixed_dit, adaptive_dit, budgets)
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    run(["curves", str(out / "stage1-mse"), "--out", str(out / "stage1_psnr.png"), "--metric", "psnr_mse"])
    run(
        [
            "curves",
            str(out / "stage2-fixed-seed0"),
            str(out / "stage2-adaptive-seed0"),
            "--out",
            str(out / "stage2_gfid.png"),
        ]
    )
    print(table)
    print(f"experiment-adaptive: {time.time() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
