"""`vlt allocate`: per-image K over a latent cache's distortion curves, written beside the cache.

Letters: S cached samples of a split, G grid levels.

    vlt allocate --cache data/latents/tokenizer-tiny-adaptive --budget 8
    vlt allocate --cache ... --budget 8 --cost k2          # equal mean attention cost as K = 8
    vlt allocate --cache ... --rule threshold --tau 24     # the smallest K with PSNR >= 24 dB
    vlt allocate --cache ... --budget 8 --source predictor # curves from the single-pass predictor

Distortion is D = -PSNR from the curves `vlt cache-latents` measured (optimal for the mean PSNR we
report), or D = MSE (`--distortion mse`, optimal for the mean squared error: it spends more tokens
on images whose error is large in absolute terms). lambda is solved on TRAIN and
the same lambda (or tau) is applied to every split, as it would be to new images at inference.
Writes allocation.json + k-<split>.npz (`vlt.adaptive.store`), TensorBoard histograms of K_i per
class and per complexity, and prints a table: achieved mean K, mean PSNR at K_i against fixed K,
Spearman correlation of K_i with the complexity label and with the PNG size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from scipy.stats import spearmanr

from vlt import console
from vlt.adaptive import allocation as A
from vlt.data.cache import Curves, LatentCache

Rule = Literal["lagrangian", "threshold"]
Source = Literal["search", "predictor"]
Distortion = A.Distortion
to_distortion = A.to_distortion
SPLITS = ("train", "val")


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")


def _rho(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho, None where it is undefined (a constant input)."""
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(spearmanr(a, b).statistic)


def _choose(d: torch.Tensor, grid: list[int], rule: Rule, lam, tau, cost: A.Cost, kind: Distortion):
    """K_i (S,) from distortions (S, G) with a solved lambda or a PSNR threshold tau (dB)."""
    if rule == "lagrangian":
        return A.lagrangian(d, grid, lam, cost)
    return A.threshold(d, grid, float(to_distortion(torch.tensor(tau), kind)))


def fixed_at(psnr_by_k: dict[int, float], budget: float, cost: A.Cost) -> float:
    """Mean PSNR of fixed K at a budget between grid levels: time-sharing between the two neighbours
    (a fraction of images at each), linear in cost units, which is what a fixed-K system can reach."""
    ks = sorted(psnr_by_k)
    c = A.cost_of(ks, cost).tolist()
    b = budget if cost == "k" else budget**2
    hi = min(int(np.searchsorted(c, b)), len(ks) - 1)
    lo = max(hi - 1, 0)
    if c[hi] == c[lo] or b >= c[hi]:
        return psnr_by_k[ks[hi]]
    t = (b - c[lo]) / (c[hi] - c[lo])
    return (1 - t) * psnr_by_k[ks[lo]] + t * psnr_by_k[ks[hi]]


def summarise(curves: Curves, ks: torch.Tensor, cost: A.Cost) -> dict:
    """Achieved mean K (and cost-equivalent K), true mean PSNR at K_i, fixed-K PSNR, Spearman rhos."""
    grid = curves.grid
    index = torch.searchsorted(torch.as_tensor(grid), ks)  # (S,)
    true = torch.as_tensor(curves.psnr).double()  # (S, G)
    k = ks.numpy()
    # Pooled PSNR = PSNR of the mean MSE over images: the figure a D = MSE allocation optimises.
    pooled = lambda p: float(-10 * torch.log10(torch.pow(10.0, -p / 10).mean()))
    at_k = true.gather(1, index[:, None]).squeeze(1)  # (S,)
    return {
        "mean_k": float(ks.double().mean()),
        "mean_cost": A.mean_cost(ks, cost),
        "psnr": float(at_k.mean()),
        "fixed_psnr": {int(g): float(true[:, j].mean()) for j, g in enumerate(grid)},
        "pooled_psnr": pooled(at_k),
        "fixed_pooled_psnr": {int(g): pooled(true[:, j]) for j, g in enumerate(grid)},
        "spearman": {"complexity": _rho(k, curves.complexity), "png_bytes": _rho(k, curves.png_bytes)},
    }


def agreement(curves: Curves, predicted: torch.Tensor, searched: torch.Tensor) -> dict:
    """How a predicted allocation compares with the search on the same images (true curves)."""
    grid = torch.as_tensor(curves.grid)
    true = torch.as_tensor(curves.psnr).double()  # (S, G)
    at = lambda ks: true.gather(1, torch.searchsorted(grid, ks)[:, None]).squeeze(1)
    return {
        "equal_fraction": float((predicted == searched).double().mean()),
        "mean_abs_log2_ratio": float((predicted.double().log2() - searched.double().log2()).abs().mean()),
        "mean_k": float(predicted.double().mean()),
        "search_mean_k": float(searched.double().mean()),
        "psnr": float(at(predicted).mean()),
        "search_psnr": float(at(searched).mean()),
        "psnr_given_up": float((at(searched) - at(predicted)).mean()),
    }


def _predicted(root: Path, curves: dict, distortion: str, steps: int, width: int, seed: int):
    """Distortions (S, G) per split from the single-pass predictor's curves, and its report."""
    from vlt.adaptive.predictor import predicted_curves

    pred, report = predicted_curves(root, curves, steps=steps, width=width, seed=seed)
    return {s: to_distortion(p, distortion) for s, p in pred.items()}, report


def _check_args(rule: str, cost: str, source: str, distortion: str, budget, tau) -> None:
    _check("rule", rule, get_args(Rule))
    _check("cost", cost, A.COSTS)
    _check("source", source, get_args(Source))
    _check("distortion", distortion, get_args(Distortion))
    if rule == "lagrangian" and budget is None:
        raise ValueError("rule='lagrangian' needs --budget (a mean K, e.g. 8)")
    if rule == "threshold" and tau is None:
        raise ValueError("rule='threshold' needs --tau (a PSNR in dB)")


def _meta(curves: dict[str, Curves], ks: dict[str, torch.Tensor], args: dict) -> dict:
    """allocation.json: the rule's arguments, p(K | class) on train, and per-split summaries."""
    labels = {s: torch.as_tensor(c.label) for s, c in curves.items()}
    num_classes = args["num_classes"] or max(int(max(lab.max() for lab in labels.values())) + 1, 1)
    budget, cost, grid = args["budget"], args["cost"], args["grid"]
    stats = {s: summarise(curves[s], ks[s], cost) for s in SPLITS}
    meta = {
        "rule": args["rule"], "cost": cost, "budget": budget, "requested_budget": budget,
        "lambda": args["lam"], "tau": args["tau"], "grid": grid, "distortion": args["distortion"],
        "source": args["source"], "num_classes": num_classes,
        "p_k_given_class": A.k_histogram(ks["train"], labels["train"], grid, num_classes).tolist(),
        "samples": {s: len(curves[s].keys) for s in SPLITS},
    }  # fmt: skip
    names = ("mean_k", "mean_cost", "psnr", "fixed_psnr", "pooled_psnr", "fixed_pooled_psnr", "spearman")
    meta |= {name: {s: stats[s][name] for s in SPLITS} for name in names}
    if budget is not None:
        meta["fixed_at_budget"] = {s: fixed_at(stats[s]["fixed_psnr"], budget, cost) for s in SPLITS}
    # lambda comes from train: on a shifted split the achieved mean can miss the budget either way.
    meta["fixed_at_achieved"] = {
        s: fixed_at(stats[s]["fixed_psnr"], stats[s]["mean_cost"], cost) for s in SPLITS
    }
    return meta


def allocate(
    *,
    cache: str,
    budget: float | None = None,
    rule: Rule = "lagrangian",
    cost: A.Cost = "k",
    tau: float | None = None,
    source: Source = "search",
    distortion: Distortion = "neg_psnr",
    predictor_steps: int = 1000,
    predictor_width: int = 128,
    num_classes: int | None = None,
    log_dir: str | None = None,
    seed: int = 0,
    floors: list[float] | None = None,
    shares: list[float] | None = None,
) -> dict:
    """Choose K_i for every cached image and write allocation.json + k-<split>.npz into the cache.

    Args:
        cache: a latent cache built by `vlt cache-latents` with distortion curves (train and val).
        budget: the mean budget as an equivalent fixed K (required by the Lagrangian rule).
        rule: "lagrangian" (equal slope, lambda solved on train for the budget) or "threshold".
        cost: "k" (mean K) or "k2" (mean K^2, attention cost; budget 8 means mean K^2 = 64).
        tau: the threshold rule's target PSNR in dB: K_i = the smallest K with PSNR >= tau.
        source: "search" (the measured curves) or "predictor" (curves predicted from the latents by
            a head trained on train, loaded from <cache>/predictor.pt when it matches).
        distortion: "neg_psnr" (maximise mean PSNR) or "mse" (minimise mean squared error).
        predictor_steps, predictor_width: training steps and width of the predictor head.
        num_classes: rows of p(K | class); default max label + 1 over the splits.
        log_dir: TensorBoard folder (default <cache>/tb); each call writes its own run folder in it.
        seed: predictor training seed.
        floors, shares: PSNR floors (dB) and shares (default 0.5 0.75 0.9) of a quality-target table: the
            mean K for that share of the images to reach each floor, fixed K vs a K per image (also
            stored under "targets" in allocation.json).

    Returns:
        The allocation.json content.
    """
    _check_args(rule, cost, source, distortion, budget, tau)
    root = Path(cache)
    curves, grid = _read_curves(root)
    true_d = {s: to_distortion(c.psnr, distortion) for s, c in curves.items()}  # (S, G) each
    d, report = true_d, None
    if source == "predictor":
        d, report = _predicted(root, curves, distortion, predictor_steps, predictor_width, seed)
    lam = A.solve_lambda(d["train"], grid, budget, cost) if rule == "lagrangian" else None
    ks = {s: _choose(d[s], grid, rule, lam, tau, cost, distortion) for s in SPLITS}
    meta = _meta(curves, ks, dict(rule=rule, cost=cost, budget=budget, lam=lam, tau=tau, grid=grid,
                                  distortion=distortion, source=source, num_classes=num_classes))  # fmt: skip
    if floors:
        meta["targets"] = targets(curves, grid, floors, shares or [0.5, 0.75, 0.9])
    if report is not None:
        searched = _choose(
            true_d["val"], grid, rule, _search_lambda(true_d, grid, rule, budget, cost), tau, cost, distortion
        )
        meta["predictor"] = {**report, "val": agreement(curves["val"], ks["val"], searched)}
    LatentCache(root).save_allocation(meta, {s: (curves[s].keys, ks[s].numpy()) for s in SPLITS})
    _publish(root, Path(log_dir) if log_dir else root / "tb", curves, ks, meta)
    return meta


def _publish(root: Path, log_dir: Path, curves: dict, ks: dict, meta: dict) -> None:
    """TensorBoard histograms, the tables on stdout and the closing summary of one allocation."""
    what = f"b{meta['budget']:g}" if meta["rule"] == "lagrangian" else f"tau{meta['tau']:g}"
    name = f"{meta['rule']}-{meta['cost']}-{what}-{meta['distortion']}-{meta['source']}"
    tb = write_histograms(log_dir, name, curves, ks, meta)
    print(table(meta) + (("\n" + target_table(meta["targets"])) if "targets" in meta else ""))
    _summary(root, ks, meta, tb)


def _read_curves(root: Path) -> tuple[dict[str, Curves], list[int]]:
    """Every split's distortion curves from a cache, and their common grid."""
    curves = {split: LatentCache(root).curves(split) for split in SPLITS}
    grid = A.check_grid(curves["train"].grid)
    if curves["val"].grid != grid:
        raise ValueError(f"train grid {grid} and val grid {curves['val'].grid} differ in {root}")
    return curves, grid


def _summary(root: Path, ks: dict, meta: dict, tb: Path) -> None:
    console.summary(
        f"allocate: K_i for {sum(len(k) for k in ks.values())} images",
        where=root,
        files=["allocation.json", *(f"k-{s}.npz" for s in SPLITS), str(tb)],
        numbers={f"mean K ({s})": meta["mean_k"][s] for s in SPLITS},
        next_steps=[f"make train-dit-adaptive ADAPTIVE={root}", f".venv/bin/tensorboard --logdir {tb}"],
    )


def _search_lambda(true_d: dict, grid: list[int], rule: Rule, budget: float | None, cost: A.Cost):
    return A.solve_lambda(true_d["train"], grid, budget, cost) if rule == "lagrangian" else None


def write_histograms(log_dir: Path, run: str, curves: dict, ks: dict, meta: dict) -> Path:
    """TensorBoard: histograms of K_i per class and per complexity value, and the summary scalars."""
    from torch.utils.tensorboard import SummaryWriter

    path = log_dir / run
    with SummaryWriter(str(path)) as writer:
        for split, c in curves.items():
            k = ks[split].double()
            writer.add_histogram(f"{split}/k", k, 0)
            for name, values in (("class", c.label), ("complexity", c.complexity)):
                for v in np.unique(values):
                    writer.add_histogram(f"{split}/k_by_{name}/{int(v)}", k[torch.as_tensor(values == v)], 0)
            writer.add_scalar(f"{split}/mean_k", meta["mean_k"][split], 0)
            writer.add_scalar(f"{split}/psnr", meta["psnr"][split], 0)
    return path


def targets(
    curves: dict[str, Curves], grid: list[int], floors: list[float], shares: list[float]
) -> list[dict]:
    """Quality-target rows per split, floor and share (`vlt.adaptive.allocation.target_cost`)."""
    rows = []
    for split in SPLITS:
        psnr = torch.as_tensor(curves[split].psnr).double()  # (S, G)
        for floor in floors:
            for share in shares:
                t = A.target_cost(psnr, grid, floor, share)
                rows.append({"split": split, **{k: v for k, v in t.items() if k != "k"}})
    return rows


def target_table(rows: list[dict]) -> str:
    """Markdown: mean K that a share of the images needs to reach a PSNR floor, fixed vs per image."""
    fmt = lambda x, spec=".2f": "unreachable" if x is None else format(x, spec)
    lines = [
        "tokens for a quality target (share p of the images at or above the floor):",
        "| split | floor dB | p | fixed K | per-image mean K | fewer tokens |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        saving = "-" if r["saving"] is None else f"{r['saving']:.2f}x"
        lines.append(
            f"| {r['split']} | {r['floor']:g} | {r['share']:g} | {fmt(r['fixed_k'], 'd')} | "
            f"{fmt(r['cost'])} | {saving} |"
        )
    return "\n".join(lines)


def table(meta: dict) -> str:
    """A small markdown table of the allocation, one row per split."""
    what = f"budget {meta['budget']:g}" if meta["rule"] == "lagrangian" else f"tau {meta['tau']:g} dB"
    lines = [
        f"allocation: {meta['rule']} {what} cost {meta['cost']} D={meta['distortion']} "
        f"from {meta['source']} curves, "
        f"grid {meta['grid']}",
        "| split | mean K | cost-eq K | PSNR adaptive | fixed@budget | fixed@achieved | rho cplx | rho png |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
    for s in SPLITS:
        fixed = meta.get("fixed_at_budget", {}).get(s)
        rho = meta["spearman"][s]
        lines.append(
            f"| {s} | {meta['mean_k'][s]:.2f} | {meta['mean_cost'][s]:.2f} | {meta['psnr'][s]:.2f} | "
            f"{fmt(fixed)} | {fmt(meta['fixed_at_achieved'][s])} | {fmt(rho['complexity'])} | "
            f"{fmt(rho['png_bytes'])} |"
        )
    if "predictor" in meta:
        v = meta["predictor"]["val"]
        lines.append(
            f"predictor (val): equal K {v['equal_fraction']:.3f}, mean |log2 ratio| "
            f"{v['mean_abs_log2_ratio']:.3f}, mean K {v['mean_k']:.2f} vs {v['search_mean_k']:.2f}, "
            f"PSNR given up {v['psnr_given_up']:.3f} dB"
        )
    return "\n".join(lines)
