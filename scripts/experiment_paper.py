"""The paper's Table 1 / 3 / 4 analogues on the embedded data (tiny, CPU): `make experiment-paper`.

    .venv/bin/python scripts/experiment_paper.py [--out runs/experiment-paper] [--train-seeds 2] ...

Phases, each skipped when its output exists (--fresh redoes them); results.md is rewritten after each:

1. Tokenizers (conf/tokenizer/tiny.yaml, equal steps): LGM and nested dropout (--reuse takes finished
   ones, e.g. the checkpoints of `make train-tokenizer`).
2. Latent caches (with flipped latents) and DiTs (conf/dit/tiny.yaml, equal steps), one per training
   seed on each tokenizer: one DiT for every K in each.
3. A guidance sweep on the seed-0 DiTs: `--sweep` scales at every K, under the paper's sampler
   (timestep shift 0.3, guidance for t in [0.1, 1], 24 Euler steps) and the uniform one (LGM only);
   the sampler with the lower mean best distance is used from then on, and each generator's best w
   per K becomes its per-K scale (`cfg_scales: [1, config]` in the budget evaluation).
4. Table 1: the vltnet scores (fd, kid, class accuracy) of every DiT at every K, at w = 1 and at the
   swept w, over `--noise-seeds` noise seeds; mean ± 95% t-interval over all (training x noise) seeds,
   the per-training-seed means, and Welch's t-test of LGM against nested dropout at each K.
5. Table 3 / 4: stage-1 PSNR, rfd_vltnet and merged-pair vs all-pair cosine of the tokenizers and the
   ablations of LGM (no alignment loss, 4 merge blocks, no exploration noise) at equal steps.
6. With --why: does the LGM - nested gap depend on the generator's capacity? Seed-0 DiTs on both
   tokenizers trained twice as long and 1.5x as wide (WHY_VARIANTS), scored as Table 1 at w = 1 beside
   the base DiTs, with Welch's test of LGM against nested dropout and of each variant against the base.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlt.metrics.intervals import welch  # noqa: E402

VLT = [sys.executable, "-m", "vlt.cli"]
KS = [4, 8, 16, 32]
FEATURES = "data/features"
PRIMARY = "gfd_vltnet"  # the distance every decision here is read from (issue: metrics)
SCORES = {
    "gfd_vltnet": "fd_vltnet (lower is better)",
    "gkid_vltnet": "kid_vltnet x 1e3 (lower is better)",
    "gclass_acc_vltnet": "class accuracy (higher is better)",
}
TOKENIZERS = {  # name -> overrides of conf/tokenizer/tiny.yaml
    "lgm": [],
    "nested": ["--model.init_args.merge.mode=nested"],
    "lgm-no-align": ["--model.init_args.loss.align=0.0"],
    "lgm-4-blocks": ["--model.init_args.merge.blocks=4"],
    "lgm-no-noise": ["--model.init_args.merge.noise=0.0"],
}
GENERATORS = ("lgm", "nested")
WHY_VARIANTS = {  # name -> overrides of conf/dit/tiny.yaml (base: 3000 steps, width 128, depth 4)
    "steps x2": ["--trainer.max_steps=6000"],
    "width x1.5": ["--model.init_args.dit.width=192"],
}
SAMPLERS = {  # FlowSpec fields of each sampler the sweep compares
    "paper": {"sample_steps": 24, "timestep_shift": 0.3, "cfg_interval": (0.1, 1.0)},
    "uniform": {"sample_steps": 25, "timestep_shift": 1.0, "cfg_interval": None},
}


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


def validate(module, data, name: str, out: Path, fresh: bool, **callback_args) -> tuple[dict, list[dict]]:
    """`trainer.validate` with a TokenBudgetCallback: (the module's logged metrics, the curve rows),
    read back from `out/name` when an earlier run of this script left them."""
    done = out / name / "evaluation.json"
    if done.exists() and not fresh:
        saved = json.loads(done.read_text())
        return saved["logged"], saved["rows"]
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from vlt import console
    from vlt.callbacks import TokenBudgetCallback

    console.quiet_third_party()  # the filters `vlt` applies, for the Trainers run in this process
    callback = TokenBudgetCallback(
        cache_dir=str(ROOT / "runs" / ".fid_cache"),
        dataset_id="synthetic-val",
        feature_net=FEATURES,
        feature_scores=["fd", "kid", "class_acc"],
        **callback_args,
    )
    shutil.rmtree(out / name, ignore_errors=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(out, name=name, version=""),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    logged = {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}
    rows = json.loads((out / name / "curves" / "budget_latest.json").read_text())["rows"]
    done.write_text(json.dumps({"logged": logged, "rows": rows}))
    return logged, rows


def stage1(ckpt: Path, name: str, out: Path, fresh: bool) -> dict:
    from vlt.data import WebDataModule
    from vlt.lit import LitTokenizer

    model = LitTokenizer.load_from_checkpoint(str(ckpt), map_location="cpu")
    data = WebDataModule(
        val="data/synthetic/shards/val-*.tar", image_size=32, val_batch_size=256, num_workers=0
    )
    logged, rows = validate(
        model,
        data,
        f"stage1-{name}",
        out,
        fresh,
        ks=KS,
        metrics=["psnr", "rfid"],
        num_images=512,
        batch_size=256,
    )
    return {"logged": logged, "rows": rows}


def load_dit(ckpt: Path, sampler: str, scales: dict[int, float] | None = None):
    """The stage-2 module with `sampler`'s time grid and, when given, per-K guidance scales."""
    from vlt.lit import LitDiT

    model = LitDiT.load_from_checkpoint(str(ckpt), map_location="cpu")
    gen = model.generator
    gen.spec = dataclasses.replace(gen.spec, **SAMPLERS[sampler], cfg_scales=scales)
    return model


def stage2(model, latents: Path, name: str, out: Path, fresh: bool, **callback_args) -> list[dict]:
    from vlt.data import WebDataModule

    data = WebDataModule(kind="latents", val=str(latents / "val-*.tar"), val_batch_size=512, num_workers=0)
    return validate(
        model,
        data,
        name,
        out,
        fresh,
        ks=model.ks,
        metrics=["gfid"],
        batch_size=128,
        resolution=32,
        real_shards="data/synthetic/shards/val-*.tar",
        **callback_args,
    )[1]


# ---------------------------------------------------------------------------------------------- stats
def t95(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def interval(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """mean ± the 95% t-interval half-width (n - 1 degrees of freedom)."""
    values = [v * scale for v in values]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):.{digits}f} ± {half:.{digits}f}"


def with_suffix(rows: list[dict], suffix: str = "_w1") -> list[dict]:
    """Generation columns of a one-scale evaluation (no `_w` suffix) named as in a several-scale one."""

    def name(key: str) -> str:
        if not key.startswith("g"):  # base columns (k, tokens, ...) and flops_* do not start with g
            return key
        base, ci = (key[:-3], "_ci") if key.endswith("_ci") else (key, "")
        return base + suffix + ci

    return [{name(key): value for key, value in row.items()} for row in rows]


def column(rows: list[dict], k: int, name: str) -> float | None:
    for r in rows:
        if int(float(r["k"])) == k and r.get("mode", "fixed") == "fixed" and r.get(name) not in (None, ""):
            return float(r[name])
    return None


# ---------------------------------------------------------------------------------------------- tables
def sweep_table(title: str, rows: list[dict], scales: list[float]) -> list[str]:
    lines = [
        f"#### {title}",
        "",
        "| w | " + " | ".join(f"K={k}" for k in KS) + " |",
        "|---:|" + "---|" * len(KS),
    ]
    for w in scales:
        cells = []
        for k in KS:
            mean, half = column(rows, k, f"{PRIMARY}_w{w:g}"), column(rows, k, f"{PRIMARY}_w{w:g}_ci")
            cells.append("-" if mean is None else f"{mean:.2f} ± {half:.2f}" if half else f"{mean:.2f}")
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def best_scales(rows: list[dict], scales: list[float]) -> dict[int, float]:
    """The w of the lowest primary distance at each K."""
    return {k: min(scales, key=lambda w: column(rows, k, f"{PRIMARY}_w{w:g}") or math.inf) for k in KS}


def table1(
    runs: dict[str, dict[int, list[list[dict]]]], best: dict[str, dict[int, float]], seeds: str, images: int
) -> list[str]:
    lines = [
        f"## Table 1 analogue: one DiT for every K, vltnet scores of {images} samples per seed "
        f"(mean ± 95% t-interval over {seeds})",
        "",
    ]
    for metric, what in SCORES.items():
        scale = 1e3 if "kid" in metric else 1.0
        lines += [
            f"### {what}",
            "",
            "| tokenizer | w | " + " | ".join(f"K={k}" for k in KS) + " |",
            "|---|---|" + "---|" * len(KS),
        ]
        for w in (
            ("w1", "wcfg") if any(values(r, KS[0], f"{metric}_wcfg") for r in runs.values()) else ("w1",)
        ):
            for name, per_seed in runs.items():
                label = "1" if w == "w1" else "swept: " + "/".join(f"{best[name][k]:g}" for k in KS)
                cells = [interval(values(per_seed, k, f"{metric}_{w}"), scale) for k in KS]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
            if set(runs) >= set(GENERATORS):
                lines.append(
                    f"| LGM − nested (Welch p) | {w[1:]} | "
                    + " | ".join(difference(runs, k, f"{metric}_{w}", scale) for k in KS)
                    + " |"
                )
        lines.append("")
    return lines


def values(per_seed: dict[int, list[list[dict]]], k: int, name: str) -> list[float]:
    """Every (training seed, noise seed) value of column `name` at K."""
    out = [column(rows, k, name) for runs in per_seed.values() for rows in runs]
    return [v for v in out if v is not None]


def difference(runs, k: int, name: str, scale: float) -> str:
    a, b = values(runs["lgm"], k, name), values(runs["nested"], k, name)
    if len(a) < 2 or len(b) < 2:
        return "-"
    d, half, p = welch([v * scale for v in a], [v * scale for v in b])
    return f"{d:+.2f} ± {half:.2f} (p={p:.2g}){' *' if p < 0.05 else ''}"


def per_training_seed(runs: dict[str, dict[int, list[list[dict]]]]) -> list[str]:
    lines = [
        f"### {PRIMARY} at w = 1 per training seed (mean over noise seeds): the spread training adds",
        "",
        "| tokenizer | training seed | " + " | ".join(f"K={k}" for k in KS) + " |",
        "|---|---:|" + "---|" * len(KS),
    ]
    for name, per_seed in runs.items():
        for seed, noise_runs in per_seed.items():
            cells = [interval(values({seed: noise_runs}, k, f"{PRIMARY}_w1")) for k in KS]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def table34(s1: dict[str, dict]) -> list[str]:
    lines = [
        "## Table 3 / 4 analogues: stage 1 at equal steps (synthetic val, 512 images)",
        "",
        "PSNR in dB; rfd_vltnet ± bootstrap half-width; merged cos: mean cosine of the merge embeddings of "
        "slot pairs merged at K, against all pairs.",
        "",
        "| tokenizer | "
        + " | ".join(f"PSNR K={k}" for k in KS)
        + " | "
        + " | ".join(f"rfd K={k}" for k in KS)
        + " | "
        + " | ".join(f"merged cos K={k}" for k in KS[:-1])
        + " | all-pair cos |",
        "|---|" + "---|" * (3 * len(KS)),
    ]
    for name, res in s1.items():
        log, rows = res["logged"], res["rows"]
        psnr = [f"{log.get(f'val/psnr@k{k}', float('nan')):.2f}" for k in KS]
        rfd = [
            f"{column(rows, k, 'rfd_vltnet'):.2f} ± {column(rows, k, 'rfd_vltnet_ci'):.2f}"
            if column(rows, k, "rfd_vltnet") is not None
            else "-"
            for k in KS
        ]
        cos = [
            f"{log[f'val/merged_cos@k{k}']:.3f}" if f"val/merged_cos@k{k}" in log else "-" for k in KS[:-1]
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(psnr + rfd + cos)
            + f" | {log.get('val/slot_cos', float('nan')):.3f} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------- main
def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/experiment-paper")
    parser.add_argument("--tok-steps", type=int, default=None, help="tokenizer steps (default: the config's)")
    parser.add_argument("--dit-steps", type=int, default=None, help="DiT steps (default: the config's)")
    parser.add_argument("--noise-seeds", type=int, default=3)
    parser.add_argument("--train-seeds", type=int, default=2)
    parser.add_argument("--sweep", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0])
    parser.add_argument("--sweep-images", type=int, default=256, help="samples per (K, w) in the sweep")
    parser.add_argument("--images", type=int, default=512, help="samples per (K, w, seed) in Table 1")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--why", action="store_true", help="phase 6: DiT capacity variants (~60 min)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        metavar="NAME=CKPT",
        help="finished runs to reuse: tokenizers by name (lgm=runs/tokenizer-tiny/checkpoints/last.ckpt, "
        "nested=...) and DiTs as dit-<tokenizer>-seed<N>=CKPT (trained on that tokenizer, checked). Taken "
        "only when the file exists and no --tok-steps / --dit-steps is given, so every run keeps the "
        "config's steps",
    )
    return parser.parse_args()


def reusable(args, name: str, steps: int | None) -> Path | None:
    path = dict(item.split("=", 1) for item in args.reuse).get(name)
    if path and (ROOT / path).exists() and not steps and not args.fresh:
        return ROOT / path
    return None


def dit_for(args, name: str, seed: int, tokenizer: Path, latents: Path, runs: Path) -> Path:
    import torch

    reused = reusable(args, f"dit-{name}-seed{seed}", args.dit_steps)
    if reused is not None:
        trained_on = torch.load(reused, map_location="cpu", weights_only=False)["hyper_parameters"][
            "tokenizer"
        ]
        if (ROOT / trained_on).resolve() == tokenizer.resolve():
            print(f"reusing {reused} as dit-{name}-seed{seed}")
            return reused
        print(f"not reusing {reused}: it was trained on {trained_on}, not on {tokenizer}; training one")
    extra = [f"--latents={latents}", f"--model.init_args.tokenizer={tokenizer}", f"--seed_everything={seed}"]
    extra += [f"--trainer.max_steps={args.dit_steps}"] if args.dit_steps else []
    return fit("conf/dit/tiny.yaml", f"dit-{name}-seed{seed}", runs, extra, args.fresh)


class Report:
    """results.md and results.json, rewritten after every phase so a stopped run leaves its tables."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out, self.args, self.start, self.sections = out, args, time.time(), {}

    def add(self, key: str, lines: list[str], data=None) -> None:
        self.sections[key] = (lines, data)
        minutes = (time.time() - self.start) / 60
        steps = (
            f"tokenizer steps {self.args.tok_steps or 'config'}, DiT steps {self.args.dit_steps or 'config'}"
        )
        head = [
            "# Paper tables on the embedded data (tiny presets, CPU)",
            "",
            f"{steps}; wall time {minutes:.1f} min so far (`scripts/experiment_paper.py`)",
            "",
        ]
        body = [line for lines, _ in self.sections.values() for line in [*lines, ""]]
        (self.out / "results.md").write_text("\n".join(head + body) + "\n")
        (self.out / "results.json").write_text(
            json.dumps({k: d for k, (_, d) in self.sections.items()}, indent=1)
        )
        print("\n".join(lines), flush=True)


def main() -> None:
    args = parse()
    out = ROOT / args.out
    runs = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, args)
    tok_extra = [f"--trainer.max_steps={args.tok_steps}"] if args.tok_steps else []

    def tokenizer(n: str) -> Path:
        reused = reusable(args, n, args.tok_steps)
        if reused is not None:
            print(f"reusing {reused} as tokenizer {n}")
            return reused
        return fit("conf/tokenizer/tiny.yaml", f"tok-{n}", runs, TOKENIZERS[n] + tok_extra, args.fresh)

    toks = {n: tokenizer(n) for n in GENERATORS}
    latents = {n: cache(toks[n], out / "latents" / n, args.fresh) for n in GENERATORS}
    dits = {
        n: {s: dit_for(args, n, s, toks[n], latents[n], runs) for s in range(args.train_seeds)}
        for n in GENERATORS
    }

    # Guidance sweep on the seed-0 DiTs (one noise seed, bootstrap intervals).
    sweep = dict(cfg_scales=args.sweep, num_images=args.sweep_images)
    lgm_rows = {
        s: stage2(load_dit(dits["lgm"][0], s), latents["lgm"], f"sweep-lgm-{s}", out, args.fresh, **sweep)
        for s in SAMPLERS
    }
    best_of = {
        s: statistics.mean(min(column(r, k, f"{PRIMARY}_w{w:g}") for w in args.sweep) for k in KS)
        for s, r in lgm_rows.items()
    }
    sampler = min(best_of, key=best_of.get)
    rows = {"lgm": lgm_rows[sampler]}
    rows["nested"] = stage2(
        load_dit(dits["nested"][0], sampler),
        latents["nested"],
        f"sweep-nested-{sampler}",
        out,
        args.fresh,
        **sweep,
    )
    best = {n: best_scales(r, args.sweep) for n, r in rows.items()}
    lines = [
        "## Guidance sweep (seed-0 DiTs, "
        f"{args.sweep_images} samples, one noise seed, {PRIMARY} ± bootstrap half-width)",
        "",
        "Mean over K of the best distance: "
        + ", ".join(f"{s} sampler {v:.2f}" for s, v in best_of.items())
        + f"; the {sampler} sampler ({SAMPLERS[sampler]}) is used below.",
        "",
    ]
    lines += sweep_table("lgm, uniform sampler", lgm_rows["uniform"], args.sweep)
    lines += sweep_table("lgm, paper sampler", lgm_rows["paper"], args.sweep)
    lines += sweep_table(f"nested, {sampler} sampler", rows["nested"], args.sweep)
    lines += [
        "Best w per K: "
        + "; ".join(f"{n} " + ", ".join(f"K={k}: {w:g}" for k, w in b.items()) for n, b in best.items())
    ]
    report.add(
        "sweep",
        lines,
        {"sampler": sampler, "best": best, "rows": {"lgm": lgm_rows, "nested": rows["nested"]}},
    )

    # Table 1 over training x noise seeds at w = 1 and the swept w per K (w = 1 alone when the sweep
    # chose no guidance anywhere: the second column would repeat the first at twice the cost).
    guided = any(w != 1.0 for b in best.values() for w in b.values())
    table: dict[str, dict[int, list[list[dict]]]] = {}
    for n in GENERATORS:
        table[n] = {}
        for s, ckpt in dits[n].items():
            model = load_dit(ckpt, sampler, best[n])
            table[n][s] = [
                stage2(
                    model,
                    latents[n],
                    f"table1-{n}-seed{s}-noise{z}",
                    out,
                    args.fresh,
                    cfg_scales=[1.0, "config"] if guided else [1.0],
                    num_images=args.images,
                    seed=z,
                    replicates=0,
                )
                if guided
                else with_suffix(
                    stage2(model, latents[n], f"table1-{n}-seed{s}-noise{z}", out, args.fresh,
                           cfg_scales=[1.0], num_images=args.images, seed=z, replicates=0)
                )
                for z in range(args.noise_seeds)
            ]  # fmt: skip
    seeds = f"{args.train_seeds} training seeds x {args.noise_seeds} noise seeds"
    lines = table1(table, best, seeds, args.images) + per_training_seed(table)
    lines += [
        "Paper (ImageNet 256, DiT-B, gFID, K = 32 / 64 / 128): LGM 3.19 / 3.09 / 2.79; "
        "nested dropout 5.21 / 5.01 / 4.69. `*`: p < 0.05."
    ]
    report.add("table1", lines, table)

    # Stage 1 and the ablations (Table 3 / 4 analogues).
    names = list(TOKENIZERS) if args.ablations else list(GENERATORS)
    toks |= {n: tokenizer(n) for n in names if n not in toks}
    s1 = {n: stage1(ckpt, n, out, args.fresh) for n, ckpt in toks.items()}
    report.add("stage1", table34(s1), s1)
    if args.why:
        base = {n: table[n][0] for n in GENERATORS}
        report.add("why", *why_study(args, toks, latents, runs, out, sampler, base))


def why_study(args, toks, latents, runs: Path, out: Path, sampler: str, base: dict[str, list[list[dict]]]):
    """Phase 6: the seed-0 DiT of each tokenizer against WHY_VARIANTS of it, every one scored at w = 1
    over the noise seeds. Returns (results.md lines, the rows)."""
    rows: dict[str, dict[str, list[list[dict]]]] = {"base": base}
    for variant, overrides in WHY_VARIANTS.items():
        rows[variant] = {}
        for n in GENERATORS:
            tag = variant.replace(" ", "").replace(".", "")
            extra = [
                f"--latents={latents[n]}",
                f"--model.init_args.tokenizer={toks[n]}",
                "--seed_everything=0",
            ]
            ckpt = fit("conf/dit/tiny.yaml", f"dit-{n}-{tag}", runs, extra + overrides, args.fresh)
            model = load_dit(ckpt, sampler)
            rows[variant][n] = [
                with_suffix(stage2(model, latents[n], f"why-{n}-{tag}-noise{z}", out, args.fresh,
                                   cfg_scales=[1.0], num_images=args.images, seed=z, replicates=0))
                for z in range(args.noise_seeds)
            ]  # fmt: skip
    name = f"{PRIMARY}_w1"
    lines = [
        f"## Why: the generator's capacity (seed-0 DiTs, {PRIMARY} at w = 1, {args.images} samples, "
        f"mean ± 95% t-interval over {args.noise_seeds} noise seeds)",
        "",
        "Variants of conf/dit/tiny.yaml (3000 steps, width 128, depth 4): "
        + "; ".join(f"{v}: {' '.join(o)}" for v, o in WHY_VARIANTS.items())
        + ". `*`: p < 0.05 (Welch).",
        "",
        "| DiT | tokenizer | " + " | ".join(f"K={k}" for k in KS) + " |",
        "|---|---|" + "---|" * len(KS),
    ]
    for variant, by_tok in rows.items():
        for n in GENERATORS:
            cells = [interval(values({0: by_tok[n]}, k, name)) for k in KS]
            if variant != "base":  # the change against the base DiT of the same tokenizer
                cells = [
                    f"{c} ({_welch_cell(values({0: by_tok[n]}, k, name), values({0: base[n]}, k, name))})"
                    for c, k in zip(cells, KS)
                ]
            lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
        gap = [difference({g: {0: by_tok[g]} for g in GENERATORS}, k, name, 1.0) for k in KS]
        lines.append(f"| {variant} | LGM − nested | " + " | ".join(gap) + " |")
    lines += [
        "",
        "In brackets: the change against the base DiT on the same tokenizer, ± its Welch half-width.",
    ]
    return lines, rows


def _welch_cell(a: list[float], b: list[float]) -> str:
    if len(a) < 2 or len(b) < 2:
        return "-"
    d, half, p = welch(a, b)
    return f"{d:+.2f} ± {half:.2f}{' *' if p < 0.05 else ''}"


if __name__ == "__main__":
    main()
