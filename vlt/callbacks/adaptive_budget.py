"""Adaptive rows of the token-budget curves: per-image K at a mean budget, beside the fixed-K rows.

Letters: B images (this rank), T images (all ranks), G evaluated K levels.

Reconstruction (stage 1): the fixed-K pass already measured every image's PSNR at every K, i.e. its
distortion curve D_i(K). For each budget the Lagrangian allocation is solved on the curves of ALL
ranks' images (gathered, so every rank agrees on lambda), the adaptive PSNR is read off the curves,
and rFID reconstructs each image once more at its own K_i. This is an oracle allocation (the search,
on the evaluated images themselves); a learned predictor can only do worse.

The objective decides who gets tokens. "mse" (D = squared error, classical rate-distortion) minimises
the set's mean squared error, i.e. maximises `psnr_mse` = PSNR of the mean MSE, and gives tokens to
busy images, whose error falls most in absolute terms. "neg_psnr" (D = -PSNR) maximises the mean of
per-image PSNR in dB, and gives tokens to whichever images gain the most dB per token, which can be
the simple ones (their error is small, so halving it is worth as many dB as for a busy image).

Generation (stage 2): the module samples each image at a K drawn from p(K | class) tilted to the
budget (`budget_generate_adaptive`); the row reports the K it actually used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vlt.adaptive.allocation import COSTS, allocate, to_distortion
from vlt.callbacks.budget_data import gather_rows
from vlt.callbacks.budget_scores import columns, scalar_name
from vlt.metrics.fid import metric_name
from vlt.metrics.intervals import combine


def psnr_of_mean_mse(psnr: Tensor) -> float:
    """PSNR (dB) of the mean squared error over a set of images, from their per-image PSNR."""
    return float(-10 * torch.log10(torch.pow(10.0, -psnr.double() / 10).mean()))


def mode_name(cost: str) -> str:
    """The `mode` column of an adaptive row: equal mean K ("adaptive") or equal mean K^2."""
    return "adaptive" if cost == "k" else f"adaptive-{cost}"


def check_budgets(budgets: list[float], costs: list[str], ks: list[int]) -> None:
    for cost in costs:
        if cost not in COSTS:
            raise ValueError(f"unknown budget cost {cost!r}; expected a subset of {COSTS}")
    for b in budgets:
        if not ks[0] <= b <= ks[-1]:
            raise ValueError(f"budget {b} lies outside the evaluated K range [{ks[0]}, {ks[-1]}]: extend ks")


def reconstruction_rows(
    callback: Any, trainer, pl_module, scorer, images: list[Tensor], psnr_local: Tensor, base: dict
) -> tuple[list[dict], dict[str, float]]:
    """Adaptive rows, one per budget and cost, from per-image PSNR curves psnr_local (B, G) over ks."""
    grid = callback.ks
    curves, offset = gather_rows(psnr_local.double())  # (T, G)
    flops = {k: float(pl_module.budget_flops(k, "reconstruct", 1.0)) for k in grid}
    rows, scalars = [], {}
    for cost in callback.budget_costs:
        for budget in callback.budgets:
            ks_all, lam = allocate(
                to_distortion(curves, callback.budget_distortion), grid, budget, cost
            )  # (T,)
            index = torch.searchsorted(torch.as_tensor(grid), ks_all)
            row = {**base, "k": budget, "mode": mode_name(cost), "budget": budget, "lambda": lam}
            row["tokens"] = float(ks_all.double().mean())
            row["k_rms"] = float(ks_all.double().pow(2).mean().sqrt())
            row["flops"] = float(torch.tensor([flops[int(k)] for k in ks_all]).mean())
            values = {}
            if "psnr" in callback.metrics:
                chosen = curves.gather(1, index[:, None]).squeeze(1)  # (T,)
                values["psnr"], values["psnr_mse"] = float(chosen.mean()), psnr_of_mean_mse(chosen)
            if "rfid" in callback.metrics:
                mine = ks_all[offset : offset + len(psnr_local)]
                values.update(_scores_at(trainer, pl_module, scorer, images, mine))
            row.update(values)
            rows.append(row)
            scalars.update(_scalars(row, values))
    return rows, scalars


def _scores_at(trainer, pl_module, scorer, images: list[Tensor], ks: Tensor) -> dict[str, float]:
    """Reconstruction scores (rfid, r*_vltnet) with image i at ks[i] (grouped by K within each batch)."""
    scorer.start()
    start = 0
    for x in images:
        x = x.to(pl_module.device)  # (B, 3, H, W)
        mine = ks[start : start + len(x)]
        start += len(x)
        out = torch.empty_like(x)
        for k in mine.unique().tolist():
            sel = (mine == k).nonzero().squeeze(1).to(x.device)
            with trainer.precision_plugin.forward_context():
                out[sel] = pl_module.budget_reconstruct(x[sel], int(k)).float()
        scorer.add(out.clamp(-1, 1))
    return columns(scorer.finish("r"))


def generation_rows(
    callback: Any, trainer, pl_module, scorer, labels: list[Tensor], base: dict, rank: int
) -> tuple[list[dict], dict[str, float]]:
    """Adaptive generation rows: per-image K from the module's p(K | class) tilted to each budget."""
    rows, scalars = [], {}
    for budget in callback.budgets:
        row = {**base, "k": budget, "mode": "adaptive", "budget": budget}
        values, used = {}, []
        for scale in callback.cfg_scales:
            suffix = f"_w{scale:g}" if len(callback.cfg_scales) > 1 else ""
            per_seed, flops = [], 0.0
            for seed in range(callback.seeds):
                ks_cat, flops = _generate_at(
                    callback, trainer, pl_module, scorer, labels, (budget, scale), seed
                )
                per_seed.append(scorer.finish("g"))
                if seed == 0:
                    used.append(ks_cat)
            values.update(columns(combine(per_seed, callback.confidence), suffix))
            column = metric_name("gfid", callback.extractor) + suffix
            row[f"flops_{column}"] = flops
            row.setdefault("flops", row[f"flops_{column}"])
        ks_used = used[0]
        totals = gather_rows(
            torch.stack([ks_used.sum(), ks_used.pow(2).sum(), torch.tensor(float(len(ks_used)))])[None]
        )[0]
        total, total_sq, count = totals.sum(0).tolist()
        row["tokens"] = total / max(count, 1.0)
        row["k_rms"] = (total_sq / max(count, 1.0)) ** 0.5
        row.update(values)
        rows.append(row)
        scalars.update(_scalars(row, values))
    return rows, scalars


def _generate_at(callback, trainer, pl_module, scorer, labels, at: tuple[float, float], seed: int):
    """Feed one seed's adaptive samples at (budget, scale) to `scorer`: (K per image, FLOPs per image)."""
    budget, scale = at
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    generator = torch.Generator(pl_module.device).manual_seed(callback.seed + seed + 1000 * rank)
    scorer.start()
    flops, ks_seen = 0.0, []
    for y in labels:
        with trainer.precision_plugin.forward_context():
            images, ks = pl_module.budget_generate_adaptive(y.to(pl_module.device), budget, scale, generator)
        scorer.add(images.float().clamp(-1, 1), y)
        ks_seen.append(ks.cpu())
        flops += sum(float(pl_module.budget_flops(int(k), "generate", scale)) for k in ks.tolist())
    ks_cat = torch.cat(ks_seen).double()
    return ks_cat, flops / max(len(ks_cat), 1)


def _scalars(row: dict, values: dict[str, float]) -> dict[str, float]:
    tag = f"{row['mode']}_b{row['budget']:g}"
    out = {f"budget/tokens@{tag}": row["tokens"], f"budget/tflops@{tag}": row["flops"] / 1e12}
    for column, value in values.items():
        out[scalar_name(column, tag)] = value
    return out
