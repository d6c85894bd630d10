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

import torch
from torch import Tensor

from vlt.adaptive.allocation import allocate, target_cost, to_distortion
from vlt.metrics.budget.distributed import gather_rows
from vlt.metrics.budget.modules import Run
from vlt.metrics.budget.scorer import columns
from vlt.metrics.budget.settings import BudgetSettings, scale_arg
from vlt.metrics.fid import metric_name
from vlt.metrics.intervals import combine


def psnr_of_mean_mse(psnr: Tensor) -> float:
    """PSNR (dB) of the mean squared error over a set of images, from their per-image PSNR."""
    return float(-10 * torch.log10(torch.pow(10.0, -psnr.double() / 10).mean()))


def mode_name(cost: str) -> str:
    """The `mode` column of an adaptive row: equal mean K ("adaptive") or equal mean K^2."""
    return "adaptive" if cost == "k" else f"adaptive-{cost}"


def reconstruction_rows(settings: BudgetSettings, run: Run, psnr_local: Tensor) -> list[dict]:
    """Adaptive rows, one per budget and cost, from per-image PSNR curves psnr_local (B, G) over ks."""
    grid = settings.ks
    curves, offset = gather_rows(psnr_local.double())  # (T, G)
    flops = {k: float(run.model.budget_flops(k, "reconstruct", 1.0)) for k in grid}
    rows = []
    for cost in settings.budget_costs:
        for budget in settings.budgets:
            ks_all, lam = allocate(
                to_distortion(curves, settings.budget_distortion), grid, budget, cost
            )  # (T,)
            index = torch.searchsorted(torch.as_tensor(grid), ks_all)
            row = {**run.base, "k": budget, "mode": mode_name(cost), "budget": budget, "lambda": lam}
            row["tokens"] = float(ks_all.double().mean())
            row["k_rms"] = float(ks_all.double().pow(2).mean().sqrt())
            row["flops"] = float(torch.tensor([flops[int(k)] for k in ks_all]).mean())
            if "psnr" in run.metrics:
                chosen = curves.gather(1, index[:, None]).squeeze(1)  # (T,)
                row["psnr"], row["psnr_mse"] = float(chosen.mean()), psnr_of_mean_mse(chosen)
            if "rfid" in run.metrics:
                row.update(_scores_at(run, ks_all[offset : offset + len(psnr_local)]))
            rows.append(row)
    return rows


def target_rows(settings: BudgetSettings, run: Run, psnr_local: Tensor) -> list[dict]:
    """Quality-target rows: for each PSNR floor and share p, the tokens one fixed K needs for p of the
    images to reach the floor (mode `target-fixed-p<p>`) and what a K per image needs (`target-p<p>`),
    from the per-image curves of all ranks. `saving` is the fixed cost over the per-image cost."""
    grid = settings.ks
    curves, _ = gather_rows(psnr_local.double())  # (T, G)
    flops = torch.tensor([float(run.model.budget_flops(k, "reconstruct", 1.0)) for k in grid])  # (G,)
    rows = []
    for floor in settings.targets:
        for share in settings.target_shares:
            t = target_cost(curves, grid, floor, share)
            point = {**run.base, "floor": floor}
            if t["fixed_k"] is not None:
                ks = torch.full((len(curves),), t["fixed_k"])
                rows.append(
                    {**point, "mode": f"target-fixed-p{share:g}", **_at(curves, grid, ks, flops, floor)}
                )
            if t["k"] is not None:
                saving = {"saving": t["saving"]} if t["saving"] is not None else {}
                rows.append(
                    {
                        **point,
                        "mode": f"target-p{share:g}",
                        **_at(curves, grid, t["k"], flops, floor),
                        **saving,
                    }
                )
    return rows


def _at(curves: Tensor, grid: list[int], ks: Tensor, flops: Tensor, floor: float) -> dict[str, float]:
    """Coordinates and values of images i at K ks[i] (T,): mean and RMS K, mean FLOPs, mean PSNR, and
    the share at or above the floor."""
    index = torch.searchsorted(torch.as_tensor(grid), ks)  # (T,)
    at = curves.gather(1, index[:, None]).squeeze(1)  # (T,)
    k = ks.double()
    return {
        "k": float(k.mean()), "tokens": float(k.mean()), "k_rms": float(k.pow(2).mean().sqrt()),
        "flops": float(flops[index].mean()), "psnr": float(at.mean()),
        "reached": float((at >= floor).double().mean()),
    }  # fmt: skip


def _scores_at(run: Run, ks: Tensor) -> dict[str, float]:
    """Reconstruction scores (rfid, r*_vltnet) with image i at ks[i] (grouped by K within each batch)."""
    run.scorer.start()
    start = 0
    for x in run.images:
        x = x.to(run.device)  # (B, 3, H, W)
        mine = ks[start : start + len(x)]
        start += len(x)
        out = torch.empty_like(x)
        for k in mine.unique().tolist():
            sel = (mine == k).nonzero().squeeze(1).to(x.device)
            with run.autocast():
                out[sel] = run.model.budget_reconstruct(x[sel], int(k)).float()
        run.scorer.add(out.clamp(-1, 1))
    return columns(run.scorer.finish("r"))


def generation_rows(settings: BudgetSettings, run: Run) -> list[dict]:
    """Adaptive generation rows: per-image K from the module's p(K | class) tilted to each budget."""
    rows = []
    for budget in settings.budgets:
        row = {**run.base, "k": budget, "mode": "adaptive", "budget": budget}
        values, used = {}, []
        for scale in settings.cfg_scales:
            per_seed, flops = [], 0.0
            for seed in range(settings.seeds):
                ks_cat, flops = _generate_at(run, (budget, scale), settings.seed + seed)
                per_seed.append(run.scorer.finish("g"))
                if seed == 0:
                    used.append(ks_cat)
            suffix = settings.suffix(scale)
            values.update(columns(combine(per_seed, settings.confidence), suffix))
            column = metric_name("gfid", settings.extractor) + suffix
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
    return rows


def _generate_at(run: Run, at: tuple[float, float | str], seed: int) -> tuple[Tensor, float]:
    """Feed one seed's adaptive samples at (budget, scale) to the scorer: (K per image, FLOPs per image)."""
    budget, scale = at[0], scale_arg(at[1])
    generator = torch.Generator(run.device).manual_seed(seed + 1000 * run.rank)
    run.scorer.start()
    flops, ks_seen = 0.0, []
    for y in run.labels:
        with run.autocast():
            samples = run.model.budget_generate_adaptive(y.to(run.device), budget, scale, generator)
        images, ks = samples[0], samples[1]
        run.scorer.add(images.float().clamp(-1, 1), y)
        ks_seen.append(ks.cpu())
        if getattr(samples, "flops", None) is not None:  # a sampler that decides K reports what it spent
            flops += float(samples.flops.sum())
        else:
            flops += sum(float(run.model.budget_flops(int(k), "generate", scale)) for k in ks.tolist())
    ks_cat = torch.cat(ks_seen).double()
    return ks_cat, flops / max(len(ks_cat), 1)
