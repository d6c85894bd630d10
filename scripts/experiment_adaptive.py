"""Content-adaptive vs fixed K on the embedded data, end to end (tiny, CPU): `make experiment-adaptive`.

    .venv/bin/python scripts/experiment_adaptive.py [--out runs/experiment-adaptive] [--fresh]

Needs the stage-1 tokenizer and the stage-2 DiT of `make train-tokenizer` / `make train-dit` (the Makefile
target builds them when missing). Steps, each skipped when its output exists (--fresh redoes them):

1. `vlt cache-latents` of the synthetic shards with per-image PSNR curves at every K of the grid.
2. `vlt allocate` at mean budgets N/8, N/4, N/2 (equal mean K and equal mean K^2; search and the single-pass
   predictor): lambda solved on train, applied to val. Left at budget N/4, cost K, search for step 3.
3. `vlt fit -c conf/dit/tiny-adaptive.yaml`: a DiT with K conditioning on K-bucketed batches.
4. Token-budget evaluations (`TokenBudgetCallback`, as in the configs): stage 1 PSNR / rfid_proxy / vltnet
   scores at every K and at each budget (per-image oracle allocation on the evaluated images); stage 2
   gfd_vltnet, gkid_vltnet, precision / recall, class consistency and gfid_proxy of the fixed DiT at every K
   and of the adaptive DiT at each budget, mean over --seeds noise seeds with a t interval, mean K, FLOPs.
   With --train_seeds S > 1 both DiTs are trained again with seeds 1..S-1 (`seed_everything` and the
   data stream's seed) and the tables give the mean and t interval over training seeds.
5. `results.md` (tables; a difference is marked significant when it exceeds the half-width of its
   interval), `allocations.json`, and figures (`vlt curves`, with error bars) in --out.

Needs the vltnet feature net (`make data` or `vlt features`; built here when missing).
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

import adaptive_compute  # the quality-vs-FLOPs phase, beside this script

ROOT = Path(__file__).resolve().parents[1]
VLT = [sys.executable, "-m", "vlt.cli"]
FEATURES = "data/features"
SCORES = (
    "gfd_vltnet",
    "gkid_vltnet",
    "gprecision_vltnet",
    "grecall_vltnet",
    "gclass_acc_vltnet",
    "gfid_proxy",
)


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


def train_dit(
    config: str, name: str, latents: Path, tokenizer: str, runs_dir: Path, fresh: bool, seed: int,
    extra: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """`vlt fit -c config [extra]` as runs/<name>; seed > 0 also seeds the training stream (reruns
    repeat it)."""
    ckpt = runs_dir / name / "checkpoints" / "last.ckpt"
    if ckpt.exists() and not fresh:
        print(f"DiT found: {ckpt}")
        return ckpt
    if fresh and ckpt.parent.parent.exists():
        shutil.rmtree(ckpt.parent.parent)
    seeding = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"] if seed else []
    run(
        [
            "fit",
            "-c",
            config,
            f"--runs_dir={runs_dir}",
            f"--name={name}",
            f"--latents={latents}",
            f"--model.init_args.tokenizer={tokenizer}",
            *seeding,
            *extra,
        ]
    )
    return ckpt


FRESH = False  # --fresh: redo evaluations whose rows are on disk


def evaluate(module, data, name: str, out: Path, **callback_args) -> list[dict]:
    """`trainer.validate` with a TokenBudgetCallback; returns the curve rows it wrote (reused from
    <out>/<name>/curves/budget_latest.json when it exists, unless --fresh)."""
    done = out / name / "curves" / "budget_latest.json"
    if done.exists() and not FRESH:
        print(f"evaluation found: {done}")
        return json.loads(done.read_text())["rows"]
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from vlt.callbacks import TokenBudgetCallback

    settings = {
        "extractor": "proxy",
        "cache_dir": str(ROOT / "runs" / ".fid_cache"),
        "dataset_id": "synthetic-val",
        "feature_net": str(ROOT / FEATURES),
        "feature_scores": ["fd", "kid", "precision", "recall", "class_acc"],
        "real_shards": str(ROOT / "data/synthetic/shards/val-*.tar"),
    }
    callback = TokenBudgetCallback(**(settings | callback_args))
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


TARGETS = [17.0, 19.0, 21.0]  # PSNR floors (dB) of the quality-target rows (synthetic val is bimodal)


def stage1(
    tokenizer: str, budgets: list[int], grid: list[int], out: Path, num_images: int, distortion: str,
    data_set: str = "synthetic",
):  # fmt: skip
    """Stage-1 rows on a data set's val shards: fixed K, per-image K at each budget, quality targets."""
    from vlt.data import WebDataModule
    from vlt.lit import LitTokenizer

    model = LitTokenizer.load_from_checkpoint(tokenizer, map_location="cpu")
    data = WebDataModule(
        val=f"data/{data_set}/shards/val-*.tar", image_size=32, val_batch_size=256, num_workers=0
    )
    return evaluate(
        model,
        data,
        f"stage1-{distortion}" if data_set == "synthetic" else f"stage1-{data_set}-{distortion}",
        out,
        targets=TARGETS,
        dataset_id=f"{data_set}-val",
        real_shards=str(ROOT / f"data/{data_set}/shards/val-*.tar"),
        ks=grid,
        metrics=["psnr", "rfid"],
        budgets=budgets,
        num_images=num_images,
        batch_size=256,
        budget_distortion=distortion,
    )


def stage2(
    ckpt: Path, latents: Path, budgets: list[int] | None, name: str, out: Path, ks: list[int], seeds: int
) -> list[dict]:
    """Generation rows of one DiT: every score as the mean over `seeds` noise seeds with a t interval
    (`<score>_ci`); a few hundred samples move between seeds, so one seed decides nothing."""
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
    return evaluate(
        model,
        data,
        name,
        out,
        ks=ks,
        metrics=["gfid"],
        cfg_scales=[1.0],  # the guidance sweep's choice (experiment-paper), whatever a checkpoint says
        budgets=budgets,
        num_images=512,
        batch_size=128,
        resolution=32,
        seeds=max(seeds, 2),
    )


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or x == "" else format(float(x), spec)


def find(rows: list[dict], mode: str, k: float) -> dict:
    return next((r for r in rows if r.get("mode", "fixed") == mode and float(r["k"]) == float(k)), {})


def metrics(row: dict) -> str:
    fd = row.get("rfd_vltnet")
    fd = "-" if fd in (None, "") else f"{float(fd):.3g} ± {float(row.get('rfd_vltnet_ci') or 'nan'):.2g}"
    return f"{fmt(row.get('psnr'))} / {fmt(row.get('psnr_mse'))} / {fmt(row.get('rfid_proxy'), '.1f')} / {fd}"


def stage1_table(rows: dict[str, list[dict]], budgets: list[int]) -> list[str]:
    lines = [
        "## Stage 1: reconstruction at equal mean K and equal mean K^2 (oracle allocation on the val images)",
        "",
        "PSNR = mean of per-image PSNR; pooled = PSNR of the mean squared error; rFID: proxy extractor; "
        "rfd_vltnet: Fréchet distance on vltnet features ± 95% bootstrap half-width.",
        "",
        "| distortion | budget | fixed K=budget: PSNR / pooled / rfid_proxy / rfd_vltnet | adaptive, mean K "
        "= budget: mean K: PSNR / pooled / rfid_proxy / rfd_vltnet | adaptive, mean K^2 = budget^2: mean K, "
        "rms K: PSNR / pooled / rfid_proxy / rfd_vltnet |",
        "|---|---:|---|---|---|",
    ]
    for distortion, table in rows.items():
        for b in budgets:
            f, a, a2 = find(table, "fixed", b), find(table, "adaptive", b), find(table, "adaptive-k2", b)
            lines.append(
                f"| {distortion} | {b} | {metrics(f)} | {fmt(a.get('tokens'))}: {metrics(a)} | "
                f"{fmt(a2.get('tokens'))}, {fmt(a2.get('k_rms'))}: {metrics(a2)} |"
            )
    return lines


def target_table(rows: dict[str, list[dict]]) -> list[str]:
    """What a PSNR floor costs: one fixed K for a share p of the images against a K per image."""
    lines = [
        "## Stage 1: tokens needed for a quality floor (per-image curves of the val images)",
        "",
        "For a PSNR floor and a share p of the images that must reach it: the smallest fixed K that gets p "
        "of them there, against a K per image (each lifted image at its own smallest K on the floor; the "
        "rest at the grid's smallest K). Saving = fixed mean K / per-image mean K.",
        "",
        "| set | floor dB | p | fixed K: K, reached | per-image K: mean K, reached | saving |",
        "|---|---:|---:|---|---|---:|",
    ]
    for name, table in rows.items():
        if name == "neg_psnr":  # the same curves as "mse": the targets do not depend on the distortion
            continue
        for r in (r for r in table if str(r.get("mode", "")).startswith("target-p")):
            share = r["mode"][len("target-p") :]
            fixed = next(
                (
                    f
                    for f in table
                    if f.get("mode") == f"target-fixed-p{share}" and f.get("floor") == r["floor"]
                ),
                {},
            )
            fixed_cell = (
                f"{fmt(fixed.get('k'), 'g')}, {fmt(fixed.get('reached'))}" if fixed else "none reaches it"
            )
            shown = "synthetic" if name == "mse" else name.split(",")[0]
            lines.append(
                f"| {shown} | {fmt(r['floor'], 'g')} | {share} | {fixed_cell} | {fmt(r['k'])}, "
                f"{fmt(r.get('reached'))} | {fmt(r.get('saving'))}x |"
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


def estimate(runs: list[list[dict]], mode: str, k: int, column: str) -> tuple[float, float] | None:
    """(mean, half-width) of `column` at (mode, k): one run's noise-seed interval, or over training seeds."""
    from vlt.metrics.intervals import t_interval

    rows = [r for r in (find(rows, mode, k) for rows in runs) if r.get(column) not in (None, "")]
    if not rows:
        return None
    if len(rows) == 1:
        return float(rows[0][column]), float(rows[0].get(f"{column}_ci") or "nan")
    e = t_interval([float(r[column]) for r in rows])
    return e.mean, e.half


def show(e: tuple[float, float] | None) -> str:
    return "-" if e is None else f"{e[0]:.3g} ± {e[1]:.2g}"


def difference(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str:
    """a - b with the half-width sqrt(h_a^2 + h_b^2) (independent estimates), and whether 0 is outside."""
    if a is None or b is None:
        return "-"
    delta, half = a[0] - b[0], (a[1] ** 2 + b[1] ** 2) ** 0.5
    return f"{delta:+.3g} ± {half:.2g} ({'significant' if abs(delta) > half else 'n.s.'})"


def stage2_table(
    fixed: list[list[dict]], adaptive: list[list[dict]], budgets: list[int], seeds: int
) -> list[str]:
    runs = len(fixed)
    spread = (
        f"mean ± t interval over {runs} training seeds"
        if runs > 1
        else f"mean ± t interval over {seeds} noise seeds"
    )
    lines = [
        f"## Stage 2: generation (w = 1, the guidance sweep's choice; 512 samples; {spread}, 95%)",
        "",
        "Fixed-K DiT at K = budget vs the adaptive DiT with K_i ~ p(K | class) tilted to the budget. "
        "Difference = adaptive - fixed; significant when it exceeds its interval's half-width (for "
        "distances lower is better, for precision / recall / class accuracy higher).",
        "",
        "| budget | score | fixed K | adaptive | adaptive - fixed | adaptive DiT at fixed K |",
        "|---:|---|---|---|---|---|",
    ]
    for b in budgets:
        for column in SCORES:
            f, a = estimate(fixed, "fixed", b, column), estimate(adaptive, "adaptive", b, column)
            af = estimate(adaptive, "fixed", b, column)
            lines.append(f"| {b} | {column} | {show(f)} | {show(a)} | {difference(a, f)} | {show(af)} |")
    lines.append("")
    lines.append("| budget | fixed: GFLOPs/img | adaptive: mean K, rms K, GFLOPs/img |")
    lines.append("|---:|---|---|")
    for b in budgets:
        frow, arow = find(fixed[0], "fixed", b), find(adaptive[0], "adaptive", b)
        gflops = lambda row: fmt(float(row["flops"]) / 1e9 if row else None)
        lines.append(
            f"| {b} | {gflops(frow)} | {fmt(arow.get('tokens'))}, {fmt(arow.get('k_rms'))}, {gflops(arow)} |"
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
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds of the stage-2 evaluations (>= 2)")
    parser.add_argument(
        "--train_seeds", type=int, default=1, help="training seeds of both DiTs (seed 0: the given --dit)"
    )
    parser.add_argument(
        "--fixed_latents", default="data/latents/tokenizer-tiny", help="the fixed DiT's cache"
    )
    parser.add_argument(
        "--split_prob", type=float, default=0.5, help="flow.split_prob of the DiT trained for coarse-to-fine"
    )
    parser.add_argument(
        "--no_compute", action="store_true", help="skip the coarse-to-fine quality-vs-FLOPs phase"
    )
    parser.add_argument("--fresh", action="store_true", help="redo every step")
    args = parser.parse_args()
    for path in (args.tokenizer, args.dit):
        if not (ROOT / path).exists():
            sys.exit(f"{path} is missing: run `make train-tokenizer` and `make train-dit` first")
    start = time.time()
    out, latents, runs_dir = ROOT / args.out, ROOT / args.latents, ROOT / args.runs_dir
    out.mkdir(parents=True, exist_ok=True)
    if not (ROOT / FEATURES / "LATEST").is_file():
        run(["features", "--out", FEATURES])
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
    fixed_ckpts, adaptive_ckpts = [ROOT / args.dit], []
    for seed in range(args.train_seeds):
        tag = f"-seed{seed}" if seed else ""
        train = functools.partial(
            train_dit, tokenizer=args.tokenizer, runs_dir=runs_dir, fresh=args.fresh, seed=seed
        )
        adaptive_ckpts.append(train("conf/dit/tiny-adaptive.yaml", f"dit-tiny-adaptive{tag}", latents))
        if seed:
            fixed_ckpts.append(train("conf/dit/tiny.yaml", f"dit-tiny{tag}", ROOT / args.fixed_latents))
    global FRESH
    FRESH = args.fresh
    rows1 = {d: stage1(args.tokenizer, budgets, grid, out, args.num_images, d) for d in ("neg_psnr", "mse")}
    rows1["photos, mse"] = stage1(args.tokenizer, budgets, grid, out, args.num_images, "mse", "photos")
    fixed_dit = [
        stage2(c, latents, None, f"stage2-fixed-train{i}", out, grid, args.seeds)
        for i, c in enumerate(fixed_ckpts)
    ]
    adaptive_dit = [
        stage2(c, latents, budgets, f"stage2-adaptive-train{i}", out, grid, args.seeds)
        for i, c in enumerate(adaptive_ckpts)
    ]
    lines = ["# Content-adaptive vs fixed K (tiny presets, embedded synthetic val)", ""]
    lines += [*stage1_table(rows1, budgets), "", *target_table(rows1), "", *allocate_table(allocs), ""]
    lines += stage2_table(fixed_dit, adaptive_dit, budgets, args.seeds)
    if not args.no_compute:
        split_ckpt = train_dit(
            "conf/dit/tiny.yaml", "dit-tiny-split", ROOT / args.fixed_latents, args.tokenizer, runs_dir,
            args.fresh, 0,
            extra=(
                f"--model.init_args.flow.split_prob={args.split_prob}",
                "--model.init_args.flow.split_detail=0",
            ),
        )  # fmt: skip
        lines += ["", *adaptive_compute.phase(ROOT / args.dit, split_ckpt, latents, adaptive_dit[0], out,
                                             args.seeds, args.fresh)]  # fmt: skip
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    run(["curves", str(out / "stage1-mse"), "--out", str(out / "stage1_psnr.png"), "--metric", "psnr_mse"])
    run(
        [
            "curves",
            str(out / "stage2-fixed-train0"),
            str(out / "stage2-adaptive-train0"),
            "--out",
            str(out / "stage2_gfd_vltnet.png"),
            "--metric",
            "gfd_vltnet",
        ]
    )
    print(table)
    print(f"experiment-adaptive: {time.time() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
