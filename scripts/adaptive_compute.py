"""Generation compute where it is needed: the quality-vs-FLOPs phase of `make experiment-adaptive`.

Methods, all scored like the rest of the experiment (gfd_vltnet and the other vltnet scores of 512
samples, mean over noise seeds with a t interval, no guidance: w = 1, the guidance sweep's choice):

- fixed K: the stage-2 DiT of `make train-dit` (`--dit`) at every K;
- per-image K from the class: the adaptive DiT's rows of the main experiment (K_i ~ p(K | class));
- coarse-to-fine with a fixed schedule (`vlt.objectives.schedule`): each schedule of SCHEDULES capped
  at K = 16 and 32, on the same DiT, splits drawing the unknown detail from the latents' prior
  (`flow.split_detail` = 1);
- two ways without that prior, on ABLATE's schedules at K = 32: splits that leave the detail out
  (split_detail = 0), and the same on a DiT trained for such splits (`flow.split_prob`);
- coarse-to-fine with per-image decisions: DECIDE's schedule, each image's final K chosen at time
  DECIDE_AT by a `CoarseDecider` (a curve predictor on the DiT's clean coarse prediction, trained on
  the cache's PSNR curves) for mean budgets DECIDE_BUDGETS.

FLOPs are the DiT's (every call of the sampler at its step's K, plus the decision call), without the
decode that every method pays once. `pareto.md` states, per method, the FLOPs saved at equal quality
(within the interval of the best fixed K) and the quality gained at equal FLOPs; `pareto.png` draws
the fronts. Every evaluation is cached in <out>/compute/<name>.json.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = [
    "4,8@0.2,16@0.4,32@0.6", "4,8@0.3,16@0.5,32@0.7", "4,8@0.4,16@0.6,32@0.8", "4,32@0.3", "8,32@0.5",
]  # fmt: skip
ABLATE = [SCHEDULES[0], SCHEDULES[3]]
DECIDE, DECIDE_AT, DECIDE_BUDGETS = SCHEDULES[0], 0.4, [16, 24]
SCORE = "gfd_vltnet"
NUM_IMAGES = 512


def evaluator(ks: list[int], seeds: int, budgets: list[int] | None = None):
    from vlt.metrics.budget import BudgetEvaluator

    return BudgetEvaluator(
        ks=ks, budgets=budgets or [], metrics=["gfid"], cfg_scales=[1.0], num_images=NUM_IMAGES,
        batch_size=128,
        extractor="proxy", cache_dir=str(ROOT / "runs" / ".fid_cache"), dataset_id="synthetic-val",
        resolution=32, feature_net=str(ROOT / "data" / "features"),
        feature_scores=["fd", "kid", "precision", "recall", "class_acc"], seeds=seeds,
    )  # fmt: skip


def cached(out: Path, name: str, fresh: bool, measure) -> list[dict]:
    path = out / "compute" / f"{name}.json"
    if path.exists() and not fresh:
        print(f"evaluation found: {path}")
        return json.loads(path.read_text())
    print(f"evaluating {name}", flush=True)
    rows = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


def decider(gen, latents: Path, out: Path):
    """Budget -> CoarseDecider over the K in use at DECIDE_AT, its predictor fit on the train curves."""
    import torch

    from vlt.adaptive.coarse import CoarseDecider, fit_decider_predictor
    from vlt.adaptive.predictor import read_latents
    from vlt.data.cache import LatentCache

    curves = LatentCache(latents).curves("train")
    z = read_latents(latents, "train", curves.keys)  # (S, N, C)
    kd = gen.decision_k(DECIDE, DECIDE_AT)
    keep = [i for i, k in enumerate(curves.grid) if k >= kd]  # the choices left at the decision
    labels, psnr = torch.as_tensor(curves.label), torch.as_tensor(curves.psnr)[:, keep]
    predictor = fit_decider_predictor(
        gen, z, labels, psnr, [curves.grid[i] for i in keep], k=kd, at=DECIDE_AT,
        path=out / "compute" / "decider.pt",
    )  # fmt: skip
    return lambda budget: CoarseDecider(predictor, budget=budget)


def measure(plain_ckpt: Path, split_ckpt: Path, latents: Path, out: Path, seeds: int, fresh: bool) -> dict:
    """Rows of every method but the class prior (that is the main experiment's adaptive DiT)."""
    import torch

    import vlt
    from vlt.metrics.budget import CoarseToFineBudget, GeneratorBudget
    from vlt.metrics.budget.data import read_shard_images

    images, labels = read_shard_images(str(ROOT / "data/synthetic/shards/val-*.tar"), NUM_IMAGES, 32, 128)
    images, labels = torch.cat(images), torch.cat(labels)
    plain, blank, split = (vlt.load(str(c)).eval() for c in (plain_ckpt, plain_ckpt, split_ckpt))
    plain.spec.split_detail = 1.0  # the unknown detail drawn from the latents' prior
    blank.spec.split_detail = split.spec.split_detail = 0.0  # left out (the split DiT is trained so)
    ev = lambda module, ks, budgets=None: evaluator(ks, seeds, budgets).evaluate(module, images, labels)
    rows = {
        "fixed": cached(out, "fixed", fresh, lambda: ev(GeneratorBudget(plain), plain.ks)),
        "fixed-split": cached(out, "fixed-split", fresh, lambda: ev(GeneratorBudget(split), [32])),
    }
    for i, s in enumerate(SCHEDULES):
        name = f"schedule{i}"
        rows[name] = cached(out, name, fresh, lambda s=s: ev(CoarseToFineBudget(plain, s), [16, 32]))
    for s in ABLATE:
        for tag, gen in (("nodetail", blank), ("split", split)):
            name = f"schedule{SCHEDULES.index(s)}-{tag}"
            rows[name] = cached(out, name, fresh, lambda s=s, gen=gen: ev(CoarseToFineBudget(gen, s), [32]))
    rule = decider(plain, latents, out)
    module = CoarseToFineBudget(plain, DECIDE, at=DECIDE_AT, decider=rule)
    rows["decided"] = cached(
        out,
        "decided",
        fresh,
        lambda: [r for r in ev(module, [16, 32], DECIDE_BUDGETS) if r["mode"] != "fixed"],
    )
    decode = float(plain.tokenizer.flops("decode"))
    for method in rows.values():  # DiT FLOPs: the decode is the same once-per-image cost for all
        for row in method:
            row["dit_flops"] = float(row["flops"]) - decode
    return rows


def points(rows: list[dict], mode: str | None = None):
    from vlt.metrics.pareto import Point

    chosen = [r for r in rows if mode is None or r.get("mode", "fixed") == mode]
    return [
        Point(float(r["dit_flops"]), float(r[SCORE]), float(r.get(f"{SCORE}_ci") or "nan")) for r in chosen
    ]


def methods(rows: dict[str, list[dict]], class_rows: list[dict], decode: float) -> dict[str, list]:
    for row in class_rows:
        row["dit_flops"] = float(row["flops"]) - decode

    def ablated(tag: str) -> list:
        return [p for s in ABLATE for p in points(rows[f"schedule{SCHEDULES.index(s)}-{tag}"])]

    return {
        "fixed K": points(rows["fixed"]),
        "per-image K from the class (adaptive DiT)": points(class_rows, "adaptive"),
        "coarse-to-fine schedule": [p for i in range(len(SCHEDULES)) for p in points(rows[f"schedule{i}"])],
        f"coarse-to-fine + per-image K decided at t = {DECIDE_AT}": points(rows["decided"]),
        "coarse-to-fine, no detail prior (split_detail 0)": ablated("nodetail"),
        "coarse-to-fine, no detail prior, DiT trained for splits": ablated("split"),
        "fixed K = 32, DiT trained for splits": points(rows["fixed-split"]),
    }


def show(mean: float, half: float) -> str:
    return f"{mean:.2f} ± {half:.2f}"


def detail_table(rows: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| run | mode | K / budget | mean K | DiT GFLOPs/img | gfd_vltnet | gkid_vltnet | class acc |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for name, method in rows.items():
        for r in method:
            kid = show(float(r["gkid_vltnet"]), float(r.get("gkid_vltnet_ci") or "nan"))
            acc = show(float(r["gclass_acc_vltnet"]), float(r.get("gclass_acc_vltnet_ci") or "nan"))
            fd = show(float(r[SCORE]), float(r.get(f"{SCORE}_ci") or "nan"))
            lines.append(
                f"| {name} | {r.get('mode', 'fixed')} | {float(r['k']):g} | {float(r['tokens']):.1f} | "
                f"{float(r['dit_flops']) / 1e9:.3f} | {fd} | {kid} | {acc} |"
            )
    return lines


def summary_table(fronts: dict[str, list]) -> list[str]:
    from vlt.metrics.pareto import best, equal_quality_saving, gain_at_equal_flops

    reference = fronts["fixed K"]
    ref = best(reference)
    lines = [
        f"Reference: the best fixed K, {SCORE} {show(ref.mean, ref.half)} at "
        f"{ref.flops / 1e9:.3f} DiT GFLOPs/img. Equal quality = a mean within that interval. The gain at "
        "equal FLOPs is the fixed-K curve (interpolated in log FLOPs) minus the method, at the method's "
        "point with the largest gain; significant when it exceeds its half-width.",
        "",
        "| method | FLOPs saved at equal quality | that point: GFLOPs, "
        + SCORE
        + " | best gain at equal FLOPs |",
        "|---|---|---|---|",
    ]
    for name, front in fronts.items():
        saving = equal_quality_saving(reference, front)
        at = (
            "-"
            if saving.point is None
            else f"{saving.point.flops / 1e9:.3f}, {show(saving.point.mean, saving.point.half)}"
        )
        saved = (
            "none (no point within the interval)" if saving.saving is None else f"{100 * saving.saving:.0f}%"
        )
        gains = [(g, p) for p in front if (g := gain_at_equal_flops(reference, p)) is not None]
        if gains:
            (gain, half), p = max(gains, key=lambda x: x[0][0])
            sig = "significant" if abs(gain) > half else "n.s."
            gained = f"{gain:+.2f} ± {half:.2f} ({sig}) at {p.flops / 1e9:.3f} GFLOPs"
        else:
            gained = "- (outside the fixed-K range)"
        lines.append(f"| {name} | {saved} | {at} | {gained} |")
    return lines


def figure(fronts: dict[str, list], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, front in fronts.items():
        front = sorted(front)
        if front:
            style = "-" if name.startswith("fixed") else "none"
            x, y, err = ([p.flops / 1e9 for p in front], [p.mean for p in front], [p.half for p in front])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, linestyle=style)
    ax.set_xscale("log")
    ax.set_xlabel("DiT GFLOPs per image")
    ax.set_ylabel(f"{SCORE} (lower is better)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def phase(plain_ckpt: Path, split_ckpt: Path, latents: Path, class_rows: list[dict], out: Path, seeds: int,
          fresh: bool) -> list[str]:  # fmt: skip
    """Measure (or reuse), then write pareto.md / pareto.png; returns the markdown lines."""
    import vlt

    rows = measure(plain_ckpt, split_ckpt, latents, out, seeds, fresh)
    decode = float(vlt.load(str(split_ckpt)).tokenizer.flops("decode"))
    fronts = methods(rows, class_rows, decode)
    lines = [
        f"## Stage 2: quality against DiT FLOPs ({SCORE}, {NUM_IMAGES} samples, mean ± t interval over "
        f"{seeds} noise seeds)",
        "",
        f"Schedules (K@t: K from flow time t on; t = 0 noise, 1 data): {', '.join(SCHEDULES)}. Each is "
        f"capped at K = 16 and 32. Per-image decisions: {DECIDE} with each image's final K chosen at t = "
        f"{DECIDE_AT} for mean budgets {DECIDE_BUDGETS}. Decode FLOPs ({decode / 1e9:.3f} G/img) are left "
        "out.",
        "",
        *summary_table(fronts),
        "",
        *detail_table(rows),
    ]
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    figure(fronts, out / "pareto.png")
    return lines
