"""The paper's Table 1 / 3 / 4 analogues on the embedded data (tiny, CPU): `make experiment-paper`.

    .venv/bin/python scripts/experiment_paper.py [--out runs/experiment-paper] [--tok-steps N] [--dit-steps N]

Steps, each skipped when its output exists (--fresh redoes them):

1. Tokenizers (conf/tokenizer/tiny.yaml, equal steps): LGM, nested dropout, and the Table 3 ablations of
   LGM that fit: no alignment loss, 4 merge blocks instead of 1, no exploration noise.
2. Stage-1 validation of each (PSNR per K, merged-pair cosine vs all-pair cosine: the Table 4 analogue),
   with a TokenBudgetCallback that also caches the real statistics gfid needs.
3. Latent caches (with flipped latents) and a DiT (conf/dit/tiny.yaml, equal steps) per training seed on
   the LGM and the nested-dropout tokenizer: one DiT for every K in each.
4. gfid at every K over `--noise-seeds` noise seeds and a sweep of guidance scales, through
   `TokenBudgetCallback` (extractor EXTRACTOR: one line to change for another feature net).
5. `results.md` (mean +- 95% t-interval over seeds) and the curve files beside it; the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLT = [sys.executable, "-m", "vlt.cli"]
EXTRACTOR = "proxy"  # the feature net of every FID-like number here; metric names carry it
GFID = f"gfid_{EXTRACTOR}" if EXTRACTOR != "inception" else "gfid"
KS = [4, 8, 16, 32]
TOKENIZERS = {  # name -> overrides of conf/tokenizer/tiny.yaml
    "lgm": [],
    "nested": ["--model.init_args.merge.mode=nested"],
    "lgm-no-align": ["--model.init_args.loss.align=0.0"],
    "lgm-4-blocks": ["--model.init_args.merge.blocks=4"],
    "lgm-no-noise": ["--model.init_args.merge.noise=0.0"],
}
GENERATORS = ("lgm", "nested")
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def run(args: list[str]) -> None:
    print("$ vlt " + " ".join(args), flush=True)
    subprocess.run(VLT + args, check=True, cwd=ROOT)


def fit(config: str, name: str, runs: Path, extra: list[str], fresh: bool) -> Path:
    ckpt = runs / name / "checkpoints" / "last.ckpt"
    if ckpt.exists() and not fresh:
        print(f"found {ckpt}")
        return ckpt
    if (runs / name).exists():
        shutil.rmtree(runs / name)
    run(["fit", "-c", config, f"--runs_dir={runs}", f"--name={name}", *extra])
    return ckpt


def cache(tokenizer: Path, latents: Path, fresh: bool) -> Path:
    if (latents / "done-val-r0.json").exists() and not fresh:
        return latents
    for split in ("train", "val"):
        shards = f"data/synthetic/shards/{split}-*.tar"
        where = ["--tokenizer", str(tokenizer), "--shards", shards, "--out", str(latents), "--split", split]
        run(["cache-latents", *where, "--overwrite", "true", "--distortion", "false"])
    return latents


def validate(module, data, name: str, out: Path, **callback_args) -> tuple[dict, list[dict]]:
    """`trainer.validate` with a TokenBudgetCallback: (the module's logged metrics, the curve rows)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from vlt.callbacks import TokenBudgetCallback

    callback = TokenBudgetCallback(
        extractor=EXTRACTOR, cache_dir=str(ROOT / "runs" / ".fid_cache"), dataset_id="synthetic-val",
        **callback_args,
    )  # fmt: skip
    shutil.rmtree(out / name, ignore_errors=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=TensorBoardLogger(out, name=name, version=""),
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    logged = trainer.validate(module, datamodule=data, verbose=False)[0]
    rows = json.loads((out / name / "curves" / "budget_latest.json").read_text())["rows"]
    return {k: float(v) for k, v in logged.items()}, rows


def stage1(ckpt: Path, name: str, out: Path) -> dict:
    from vlt.data import WebDataModule
    from vlt.lit import LitTokenizer

    model = LitTokenizer.load_from_checkpoint(str(ckpt), map_location="cpu")
    data = WebDataModule(
        val="data/synthetic/shards/val-*.tar", image_size=32, val_batch_size=256, num_workers=0
    )
    logged, rows = validate(
        model, data, f"stage1-{name}", out, ks=KS, metrics=["psnr", "rfid"], num_images=512, batch_size=256
    )
    return {"logged": logged, "rows": rows}


def stage2(
    ckpt: Path, latents: Path, name: str, out: Path, seeds: int, scales: list[float]
) -> list[list[dict]]:
    from vlt.data import WebDataModule
    from vlt.lit import LitDiT

    model = LitDiT.load_from_checkpoint(str(ckpt), map_location="cpu")
    data = WebDataModule(kind="latents", val=str(latents / "val-*.tar"), val_batch_size=512, num_workers=0)
    return [
        validate(
            model,
            data,
            f"{name}-noise{seed}",
            out,
            ks=model.ks,
            metrics=["gfid"],
            cfg_scales=scales,
            num_images=512,
            batch_size=128,
            resolution=32,
            seed=seed,
        )[1]
        for seed in range(seeds)
    ]


def interval(values: list[float]) -> str:
    """mean +- the 95% t-interval half-width (n - 1 degrees of freedom)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):.1f} ± {half:.1f}"


def gfid_values(runs: list[list[dict]], k: int, scale: float, n_scales: int) -> list[float]:
    column = GFID + (f"_w{scale:g}" if n_scales > 1 else "")
    return [float(r[column]) for rows in runs for r in rows if int(float(r["k"])) == k and r.get(column)]


def table1(gfid: dict[str, list[list[dict]]], scales: list[float]) -> list[str]:
    """One row per (pattern, w): gfid at every K, mean ± interval over noise (x training) seeds."""
    n = len(next(iter(gfid.values())))
    lines = [
        f"## Table 1 analogue: one DiT for every K ({GFID}, 512 samples, mean ± 95% t-interval over {n} "
        "seeds: noise seeds x training seeds)",
        "",
        "| tokenizer | w | " + " | ".join(f"K={k}" for k in KS) + " |",
        "|---|---:|" + "---|" * len(KS),
    ]
    for name, runs in gfid.items():
        for w in scales:
            cells = [interval(gfid_values(runs, k, w, len(scales))) for k in KS]
            lines.append(f"| {name} | {w:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paper (ImageNet 256, DiT-B, K = 32 / 64 / 128): LGM 3.19 / 3.09 / 2.79; nested 5.21 / 5.01 / 4.69.",
    ]
    return lines


def table34(s1: dict[str, dict]) -> list[str]:
    lines = [
        "## Table 3 / 4 analogues: stage 1 (PSNR dB at K; merged-pair cosine at K vs all-pair cosine)",
        "",
        "| tokenizer | " + " | ".join(f"PSNR K={k}" for k in KS) + " | "
        + " | ".join(f"merged cos K={k}" for k in KS[:-1]) + " | all-pair cos |",
        "|---|" + "---|" * (2 * len(KS)),
    ]  # fmt: skip
    for name, res in s1.items():
        log = res["logged"]
        psnr = [f"{log.get(f'val/psnr@k{k}', float('nan')):.2f}" for k in KS]
        cos = [
            f"{log[f'val/merged_cos@k{k}']:.3f}" if f"val/merged_cos@k{k}" in log else "-" for k in KS[:-1]
        ]
        lines.append(
            f"| {name} | " + " | ".join(psnr + cos) + f" | {log.get('val/slot_cos', float('nan')):.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/experiment-paper")
    parser.add_argument("--tok-steps", type=int, default=None, help="tokenizer steps (default: the config's)")
    parser.add_argument("--dit-steps", type=int, default=None, help="DiT steps (default: the config's)")
    parser.add_argument("--noise-seeds", type=int, default=3)
    parser.add_argument("--train-seeds", type=int, default=1)
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 3.0, 6.0])
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument(
        "--reuse", nargs="*", default=[], metavar="NAME=CKPT",
        help="finished tokenizers to reuse (e.g. lgm=runs/tokenizer-tiny/checkpoints/last.ckpt): taken only "
        "when they exist and --tok-steps is not given, so every tokenizer keeps the config's steps",
    )  # fmt: skip
    args = parser.parse_args()
    start, out = time.time(), ROOT / args.out
    runs = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    tok_extra = [f"--trainer.max_steps={args.tok_steps}"] if args.tok_steps else []
    dit_extra = [f"--trainer.max_steps={args.dit_steps}"] if args.dit_steps else []
    names = list(TOKENIZERS) if args.ablations else list(GENERATORS)
    reuse = {n: ROOT / p for n, p in (item.split("=", 1) for item in args.reuse)}
    toks = {}
    for n in names:
        if n in reuse and reuse[n].exists() and not args.tok_steps and not args.fresh:
            toks[n] = reuse[n]
            print(f"reusing {reuse[n]} as tokenizer {n}")
        else:
            toks[n] = fit("conf/tokenizer/tiny.yaml", f"tok-{n}", runs, TOKENIZERS[n] + tok_extra, args.fresh)
    s1 = {n: stage1(ckpt, n, out) for n, ckpt in toks.items()}
    gfid: dict[str, list[list[dict]]] = {}
    for n in GENERATORS:
        latents = cache(toks[n], out / "latents" / n, args.fresh)
        gfid[n] = []
        for seed in range(args.train_seeds):
            extra = [
                f"--latents={latents}",
                f"--model.init_args.tokenizer={toks[n]}",
                f"--seed_everything={seed}",
            ]
            dit = fit("conf/dit/tiny.yaml", f"dit-{n}-seed{seed}", runs, extra + dit_extra, args.fresh)
            gfid[n] += stage2(dit, latents, f"stage2-{n}-seed{seed}", out, args.noise_seeds, args.cfg_scales)
    minutes = (time.time() - start) / 60
    steps = f"tokenizer steps {args.tok_steps or 'config'}, DiT steps {args.dit_steps or 'config'}"
    lines = [
        "# Paper tables on the embedded data (tiny presets, CPU)",
        "",
        f"{steps}; wall time {minutes:.1f} min",
        "",
    ]
    lines += [*table1(gfid, args.cfg_scales), "", *table34(s1)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"stage1": s1, "gfid": gfid}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
