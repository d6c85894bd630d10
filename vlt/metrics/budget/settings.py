"""What a budget evaluation measures: the settings of `BudgetEvaluator`, checked when made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from vlt.adaptive.allocation import COSTS, to_distortion
from vlt.metrics.fid import EXTRACTORS, Extractor
from vlt.metrics.scores import SCORES

Metric = Literal["psnr", "rfid", "gfid"]
METRICS: tuple[str, ...] = get_args(Metric)
RECONSTRUCTION: tuple[str, ...] = ("psnr", "rfid")


@dataclass
class BudgetSettings:
    """Settings of a token-budget evaluation (see `BudgetEvaluator` for the evaluation itself).

    Args:
        ks: token counts K to evaluate.
        metrics: subset of psnr, rfid (reconstruction) and gfid (generation).
        cfg_scales: guidance scales for gfid; several scales give `_w{scale}` columns. "config" is the
            generator's own scale at each K (its `FlowSpec.cfg_scales`, else `cfg_scale`), column `_wcfg`.
        num_images: images evaluated (split over ranks: each takes its first num_images // world).
        batch_size: fixed evaluation batch size (input batches are re-cut to it).
        extractor: "inception" (needs weights + torch-fidelity) or "proxy" (columns named *_proxy).
        weights: Inception weights file; None looks in the torch hub cache.
        cache_dir: where real statistics and features are cached (shared across runs).
        dataset_id: names the real set in the cache key; change it when the data changes.
        resolution: image side for the cache key when the inputs hold no images (labels or latents).
        seed: seed of the generation noise (per rank) and of the bootstrap.
        budgets: mean token budgets evaluated in content-adaptive mode (per-image K, see
            `vlt.metrics.budget.adaptive`); rows get mode "adaptive" (equal mean K) or "adaptive-k2".
        budget_costs: which equalities the reconstruction budgets use: "k", "k2" or both.
        budget_distortion: what the reconstruction allocation optimises: "mse" or "neg_psnr".
        targets: PSNR floors (dB) of quality-target rows (needs psnr): for each floor and share in
            `target_shares`, the tokens one fixed K needs for that share of the images to reach the floor
            against a K per image (`vlt.adaptive.allocation.target_cost`).
        target_shares: shares p of the images that must reach each floor.
        feature_net: the project's trained feature net (a vltnet-<hash>.pt file or its folder); adds
            `<r|g><score>_vltnet` columns beside rfid/gfid.
        feature_scores: which vltnet scores: fd, kid, precision, recall, class_acc.
        seeds: generation noise seeds; with 2 or more every generation column is the mean over seeds
            with a Student-t interval, with 1 a bootstrap interval.
        replicates: bootstrap resamples of the evaluated images (0: no bootstrap interval).
        confidence: two-sided level of every interval (`<column>_ci` holds its half-width).
        real_shards: image shards whose first `num_images` images are the real side; default: the
            evaluated images.
    """

    ks: list[int]
    metrics: list[Metric] = field(default_factory=lambda: ["psnr", "rfid"])
    cfg_scales: list[float | Literal["config"]] = field(default_factory=lambda: [1.0])
    num_images: int = 256
    batch_size: int = 32
    extractor: Extractor = "proxy"
    weights: str | None = None
    cache_dir: str = "runs/.fid_cache"
    dataset_id: str = "val"
    resolution: int | None = None
    seed: int = 0
    budgets: list[float] = field(default_factory=list)
    budget_costs: list[str] = field(default_factory=lambda: ["k", "k2"])
    budget_distortion: str = "mse"
    targets: list[float] = field(default_factory=list)
    target_shares: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    feature_net: str | None = None
    feature_scores: list[str] = field(default_factory=lambda: ["fd", "kid", "precision", "recall"])
    seeds: int = 1
    replicates: int = 200
    confidence: float = 0.95
    real_shards: str | None = None

    def __post_init__(self) -> None:
        self.ks, self.budgets = sorted(set(self.ks)), sorted(set(self.budgets))
        self.metrics, self.cfg_scales = list(self.metrics), list(self.cfg_scales)
        for name in self.metrics:
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r}; expected a subset of {METRICS}")
        for scale in self.cfg_scales:
            if scale != "config" and not isinstance(scale, (int, float)):
                raise ValueError(
                    f"cfg_scales takes numbers or 'config' (the generator's per-K scale), got {scale!r}"
                )
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {self.extractor!r}; expected one of {EXTRACTORS}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be a non-empty list of positive token counts, got {self.ks}")
        if self.num_images < 2 or self.batch_size < 1:
            raise ValueError("num_images must be >= 2 and batch_size >= 1")
        self._check_scores()
        self._check_budgets()

    def _check_scores(self) -> None:
        scores, seeds, replicates, confidence = (
            self.feature_scores,
            self.seeds,
            self.replicates,
            self.confidence,
        )
        if set(scores) - set(SCORES) or seeds < 1 or replicates < 0 or not 0 < confidence < 1:
            raise ValueError(
                f"feature_scores must be a subset of {SCORES} (got {scores}), seeds >= 1, replicates >= 0 "
                "and 0 < confidence < 1"
            )

    def _check_budgets(self) -> None:
        for cost in self.budget_costs:
            if cost not in COSTS:
                raise ValueError(f"unknown budget cost {cost!r}; expected a subset of {COSTS}")
        for b in self.budgets:
            if not self.ks[0] <= b <= self.ks[-1]:
                raise ValueError(
                    f"budget {b} lies outside the evaluated K range [{self.ks[0]}, {self.ks[-1]}]: extend ks"
                )
        to_distortion(0.0, self.budget_distortion)  # validates the name
        if self.targets and "psnr" not in self.metrics:
            raise ValueError("targets (PSNR floors) need psnr in metrics: they are read off the PSNR curves")
        if any(not 0 < p <= 1 for p in self.target_shares):
            raise ValueError(f"target_shares must lie in (0, 1], got {self.target_shares}")

    def suffix(self, scale: float | str) -> str:
        """Column suffix of a scale: `_w{scale}` (`_wcfg` for "config") when several are evaluated."""
        if len(self.cfg_scales) < 2:
            return ""
        return "_wcfg" if scale == "config" else f"_w{scale:g}"

    def needs(self, metrics: list[str]) -> set[str]:
        """The `BudgetModule` methods that evaluating `metrics` calls."""
        calls = {"psnr": "budget_reconstruct", "rfid": "budget_reconstruct", "gfid": "budget_generate"}
        required = {calls[m] for m in metrics} | {"budget_flops", "budget_tokens"}
        if self.budgets and "gfid" in metrics:
            required.add("budget_generate_adaptive")  # adaptive generation rows
        return required


def scale_arg(scale: float | str) -> float | None:
    """What a sampler takes for a `cfg_scales` entry: the number, or None (its own scale at each K)."""
    return None if scale == "config" else float(scale)
