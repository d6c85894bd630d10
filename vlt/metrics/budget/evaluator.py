"""The token-budget evaluator: PSNR, rFID and gFID against tokens and FLOPs per image, at every K.

Letters: B batch, C channels, H/W height/width, K merged tokens.

Runs without a Trainer (see `vlt.metrics.budget` for the few-line use); `TokenBudgetCallback` calls it
from Lightning's hooks. Under DDP every rank passes its own images and the ranks' features, PSNR sums
and per-image curves meet in `vlt.metrics.budget.distributed`; every rank returns the same rows.
The evaluator owns the feature networks (built on first use, on the model's device), so they never
land in a model checkpoint, and keeps the real references while their cache key holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlt import console
from vlt.metrics.budget.adaptive import generation_rows, reconstruction_rows, target_rows
from vlt.metrics.budget.data import evaluation_set, read_shard_images
from vlt.metrics.budget.distributed import all_max, all_sum, gather_rows, world
from vlt.metrics.budget.modules import GeneratorBudget, Run, TokenizerBudget, module_device
from vlt.metrics.budget.scorer import SetScorer, columns
from vlt.metrics.budget.settings import RECONSTRUCTION, BudgetSettings, scale_arg
from vlt.metrics.features import load_vltnet, resolve
from vlt.metrics.fid import build_fid, find_inception_weights, metric_name
from vlt.metrics.intervals import combine
from vlt.metrics.rate import psnr
from vlt.metrics.real_stats import RealFeatures, RealStats, RealStatsKey, reduce_real_stats
from vlt.metrics.scores import FeatureSet

Autocast = Callable[[], AbstractContextManager]


@dataclass
class BudgetEvaluator(BudgetSettings):
    """Evaluate a model at every K in `ks` (and every budget); the settings are `BudgetSettings`'.

    Rows (one per K, then one per budget and mode) hold step, epoch, k, mode, tokens, flops and one
    column per score, each with its `<column>_ci` interval half-width where one exists.
    """

    _fid: Any = field(default=None, init=False, repr=False)
    _vltnet: nn.Module | None = field(default=None, init=False, repr=False)
    _references: tuple = field(default=(None, None), init=False, repr=False)
    _real_key: RealStatsKey | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------ entry points
    def evaluate_tokenizer(
        self, tokenizer: nn.Module, images: Tensor | Iterable, labels: Tensor | None = None, **kwargs: Any
    ) -> list[dict]:
        """Reconstruction rows (psnr, rfid of `metrics`) of a `VariableLengthTokenizer` on `images`:
        a (B, 3, H, W) tensor in [-1, 1] (with optional labels) or a loader of batches."""
        metrics = [m for m in self.metrics if m in RECONSTRUCTION]
        if not metrics:
            raise ValueError(f"metrics={self.metrics} holds no reconstruction metric {RECONSTRUCTION}")
        return self.evaluate(TokenizerBudget(tokenizer), images, labels, metrics=metrics, **kwargs)

    def evaluate_generator(
        self, generator: nn.Module, images: Tensor | Iterable | None = None, labels: Tensor | None = None,
        **kwargs: Any,
    ) -> list[dict]:  # fmt: skip
        """Generation rows (gfid) of a `LatentGenerator` with the labels of `images` (the real side), or
        of `labels` alone against `real_shards` or cached real statistics."""
        return self.evaluate(GeneratorBudget(generator), images, labels, metrics=["gfid"], **kwargs)

    def evaluate(
        self, model: Any, images: Tensor | Iterable | None = None, labels: Tensor | None = None, *,
        metrics: list[str] | None = None, step: int = 0, epoch: int = 0, autocast: Autocast = nullcontext,
    ) -> list[dict]:  # fmt: skip
        """Rows of any `BudgetModule` on this rank's first num_images // world images (or labels)."""
        self.check(model, self.metrics if metrics is None else metrics)
        batches = evaluation_set(images, labels, self.num_images // world()[1], self.batch_size)
        return self.evaluate_batches(
            model, *batches, metrics=metrics, step=step, epoch=epoch, autocast=autocast
        )

    def evaluate_batches(
        self, model: Any, images: list[Tensor], labels: list[Tensor], *, metrics: list[str] | None = None,
        step: int = 0, epoch: int = 0, autocast: Autocast = nullcontext,
    ) -> list[dict]:  # fmt: skip
        """Rows from batches already cut (images (B, 3, H, W) on any device, labels (B,)); eval mode, no
        gradients, the model's training mode restored afterwards."""
        metrics = list(self.metrics if metrics is None else metrics)
        self.check(model, metrics)
        was_training = getattr(model, "training", False)
        if isinstance(model, nn.Module):
            model.eval()
        try:
            with torch.no_grad():
                run = Run(model, images, labels, None, metrics, module_device(model), autocast=autocast)
                run.base, run.rank = {"step": step, "epoch": epoch}, world()[0]
                return self._measure(run)
        finally:
            if isinstance(model, nn.Module):
                model.train(was_training)

    def check(self, model: Any, metrics: list[str] | None = None) -> None:
        """A clear error when `model` lacks a `BudgetModule` method that `metrics` need."""
        metrics = self.metrics if metrics is None else metrics
        missing = sorted(name for name in self.needs(metrics) if not callable(getattr(model, name, None)))
        if missing:
            raise ValueError(
                f"{type(model).__name__} lacks {missing} needed by metrics={metrics}; see "
                "vlt.metrics.budget.BudgetModule"
            )

    def check_files(self, where: str = "TokenBudget") -> None:
        """Fail now, not after the first evaluation, when a weights file these metrics read is missing:
        the Inception weights of rfid/gfid (`weights`) and the vltnet feature net (`feature_net`)."""
        if {"rfid", "gfid"} & set(self.metrics) and self.extractor == "inception":
            try:
                find_inception_weights(self.weights)
            except ValueError as err:
                raise ValueError(f"{where} (init_args.weights={self.weights!r}): {err}") from None
        if self.feature_net is not None:
            try:
                resolve(self.feature_net)
            except ValueError as err:
                raise ValueError(f"{where} (init_args.feature_net={self.feature_net!r}): {err}") from None

    # ------------------------------------------------------------------ measuring
    def _measure(self, run: Run) -> list[dict]:
        recon, gen = bool(set(RECONSTRUCTION) & set(run.metrics)), "gfid" in run.metrics
        run.scorer = self._prepare_scorer(run) if {"rfid", "gfid"} & set(run.metrics) else None
        rows, curves = [], []  # curves: per K, this rank's per-image PSNR (B,)
        ks = (
            console.progress(self.ks, desc=f"budget curve ({', '.join(run.metrics)}): K")
            if not run.rank
            else self.ks
        )
        for k in ks:
            row: dict[str, Any] = {**run.base, "k": k, "mode": "fixed"}
            row["tokens"] = float(run.model.budget_tokens(k))
            values: dict[str, float] = {}  # column -> value
            if recon:
                values.update(self._reconstruct(run, k, curves))
                row["flops"] = float(run.model.budget_flops(k, "reconstruct", 1.0))
            for scale in self.cfg_scales if gen else []:
                values.update(self._generate(run, k, scale))
                column = metric_name("gfid", self.extractor) + self.suffix(scale)
                row[f"flops_{column}"] = float(run.model.budget_flops(k, "generate", scale_arg(scale)))
                row.setdefault("flops", row[f"flops_{column}"])
            rows.append({**row, **values})
        if self.budgets and recon:
            rows += reconstruction_rows(self, run, torch.stack(curves, dim=1))  # (B, G)
        if self.targets and recon:
            rows += target_rows(self, run, torch.stack(curves, dim=1))
        if self.budgets and gen:
            rows += generation_rows(self, run)
        return rows

    def _reconstruct(self, run: Run, k: int, curves: list[Tensor]) -> dict[str, float]:
        if run.scorer is not None:
            run.scorer.start()
        per_image = []
        for x, label in zip(run.images, run.labels):
            x = x.to(run.device)  # (B, 3, H, W)
            with run.autocast():
                y = run.model.budget_reconstruct(x, k)
            y = y.float().clamp(-1, 1)  # (B, 3, H, W)
            per_image.append(psnr(y, x).double().cpu())  # (B,)
            if run.scorer is not None and "rfid" in run.metrics:
                run.scorer.add(y, label)
        curves.append(torch.cat(per_image) if per_image else torch.zeros(0, dtype=torch.float64))
        out = {}
        if "psnr" in run.metrics:
            # The mean PSNR, and the PSNR of the mean squared error (what an "mse" allocation maximises).
            err = float(torch.pow(10.0, -curves[-1] / 10).sum())
            total, count, err = all_sum([float(curves[-1].sum()), float(len(curves[-1])), err], run.device)
            out["psnr"] = total / max(count, 1.0)
            out["psnr_mse"] = -10 * math.log10(max(err / max(count, 1.0), 1e-10))
        if "rfid" in run.metrics:
            out.update(columns(run.scorer.finish("r")))
        return out

    def _generate(self, run: Run, k: int, scale: float | str) -> dict[str, float]:
        """Columns of generation at (K, guidance scale): every score, over `seeds` noise seeds."""
        per_seed, w = [], scale_arg(scale)
        for s in range(self.seeds):
            generator = torch.Generator(run.device).manual_seed(self.seed + s + 1000 * run.rank)
            run.scorer.start()
            for y in run.labels:
                with run.autocast():
                    images = run.model.budget_generate(y.to(run.device), k, w, generator)
                run.scorer.add(images, y)
            per_seed.append(run.scorer.finish("g"))
        return columns(combine(per_seed, self.confidence), self.suffix(scale))

    # ------------------------------------------------------------------ the real side
    def _prepare_scorer(self, run: Run) -> SetScorer:
        """Feature nets on the model's device and the real references (cached on disk, reused while the
        key holds)."""
        device = run.device
        if self._fid is None:
            self._fid = build_fid(self.extractor, self.weights)
        self._fid = self._fid.to(device)
        if self.feature_net is not None and self._vltnet is None:
            self._vltnet = load_vltnet(self.feature_net)
        if self._vltnet is not None:
            self._vltnet = self._vltnet.to(device)
        real, real_labels = self._real_images(run.images, run.labels)
        key = self._real_stats_key(real, run.labels, device)
        if key != self._real_key:
            RealStats(cache_dir=self.cache_dir).prepare(self._fid, key, real)
            mu, sigma, _ = reduce_real_stats(self._fid)
            vltnet_real = self._real_features(key, real, real_labels, device) if self._vltnet else None
            self._references = ((torch.as_tensor(mu), torch.as_tensor(sigma)), vltnet_real)
            self._real_key = key
        return SetScorer(
            fid_net=self._fid.inception, fid_real=self._references[0], fid_kind=self.extractor,
            vltnet=self._vltnet, vltnet_real=self._references[1], scores=self.feature_scores,
            replicates=self.replicates, confidence=self.confidence, seed=self.seed,
        )  # fmt: skip

    def _real_images(self, images: list[Tensor], labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """This rank's share of the real images: the evaluated ones, or all of `real_shards` on rank zero."""
        if not self.real_shards:
            return images, (labels if images else [])
        side = self.resolution or (images[0].shape[-1] if images else None)
        if side is None:
            raise ValueError("real_shards=... needs resolution=... when the evaluated data holds no images")
        if world()[0] != 0:
            return [], []
        return read_shard_images(self.real_shards, self.num_images, side, self.batch_size)

    def _real_stats_key(self, real: list[Tensor], labels: list[Tensor], device: torch.device) -> RealStatsKey:
        # Labels alone (latents, or a generation-only call) still name the real set's size.
        n_local = sum(len(x) for x in real) if real or self.real_shards else sum(len(y) for y in labels)
        n_total = int(all_sum([float(n_local)], device)[0])
        # A rank may hold no images (exactly-once validation split): agree on the side over ranks.
        side = int(all_max(float(real[0].shape[-1] if real else (self.resolution or 0)), device)) or None
        if side is None:
            raise ValueError("the evaluated data holds no images: set resolution=... (the real image side)")
        key = RealStatsKey(self.dataset_id, self._fid.inception.name, int(side), n_total)
        cache = RealStats(cache_dir=self.cache_dir)
        if key != self._real_key and all_max(1.0 if real else 0.0, device) == 0 and not cache.exists(key):
            raise ValueError(
                f"no real images and no cached statistics at {cache.path(key)}: set real_shards, or run an "
                "image evaluation with the same dataset_id and cache_dir first"
            )
        return key

    def _real_features(
        self, key: RealStatsKey, real: list[Tensor], labels: list[Tensor], device
    ) -> FeatureSet:
        """vltnet features and labels of the real images: from the cache, else computed, gathered, saved."""
        key = RealStatsKey(key.dataset, self._vltnet.name, key.resolution, key.num_images)
        store = RealFeatures(cache_dir=self.cache_dir)
        cached = store.load(key)
        if cached is None:
            if all_max(1.0 if real else 0.0, device) == 0:
                raise ValueError(
                    f"no real images for vltnet features and no cache at {store.path(key)}: set real_shards "
                    "(the image shards of the real set)"
                )
            feats = [self._vltnet(x.to(device)).double().cpu() for x in real]
            width = self._vltnet.num_features
            local = torch.cat(feats) if feats else torch.zeros(0, width, dtype=torch.float64)
            local_labels = torch.cat(labels).double()[:, None] if labels else torch.zeros(0, 1)
            features, all_labels = gather_rows(local)[0], gather_rows(local_labels.double())[0][:, 0]
            cached = (features.numpy(), all_labels.long().numpy())
            store.save(key, *cached)
        return FeatureSet(torch.as_tensor(cached[0]), labels=torch.as_tensor(cached[1]))
