"""Token-budget evaluation: PSNR, rFID and gFID against tokens and FLOPs per image, for a list of K.

Letters: B batch, C channels, H/W height/width, K merged tokens.

The callback owns the FID feature network (so it never lands in model checkpoints) and works with
any LightningModule that implements `BudgetModule`. All ranks evaluate their share of the first
`num_images` validation images and torchmetrics sums the FID states across ranks; rank zero then
logs per-K scalars, figures and a custom-scalars layout to TensorBoard, and writes the curve as
CSV/JSON under `trainer.log_dir/curves/` (read by `vlt curves`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol, get_args

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vlt.adaptive.allocation import to_distortion
from vlt.callbacks.adaptive_budget import (
    check_budgets,
    generation_rows,
    reconstruction_rows,
)
from vlt.callbacks.budget_data import collect_images, gather_rows, read_shard_images
from vlt.callbacks.budget_scores import SetScorer, columns, scalar_name
from vlt.callbacks.curves import by_mode, metric_columns, plot_curves, write_curve
from vlt.metrics.features import load_vltnet
from vlt.metrics.fid import EXTRACTORS, Extractor, build_fid, metric_name
from vlt.metrics.intervals import combine
from vlt.metrics.rate import psnr
from vlt.metrics.real_stats import RealFeatures, RealStats, RealStatsKey, reduce_real_stats
from vlt.metrics.scores import SCORES, FeatureSet

Metric = Literal["psnr", "rfid", "gfid"]
METRICS: tuple[str, ...] = get_args(Metric)


class BudgetModule(Protocol):
    """What a LightningModule implements to be evaluated at token budgets (the stage modules do).

    A stage implements what its metrics need: reconstruction (psnr, rfid) needs `budget_reconstruct`,
    generation (gfid) needs `budget_generate`; both need `budget_flops` and `budget_tokens`.
    """

    def budget_reconstruct(self, images: Tensor, k: int) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> encode, merge to K tokens, decode -> (B, 3, H, W) in [-1, 1]."""
        ...

    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float, generator: torch.Generator) -> Tensor:
        """labels (B,) -> sample K tokens with guidance scale `cfg_scale`, decode -> (B, 3, H, W)."""
        ...

    def budget_flops(self, k: int, task: Literal["reconstruct", "generate"], cfg_scale: float) -> float:
        """Forward FLOPs per image of `task` at K (all sampling steps and guidance passes included)."""
        ...

    def budget_tokens(self, k: int) -> float:
        """Tokens per image at K: K itself for a fixed K, the mean over images in adaptive mode."""
        ...


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (on the device the process group reduces)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _all_max(value: float, device: torch.device) -> float:
    """Max of a float over ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _check_args(metrics: list[str], extractor: str, ks: list[int], num_images: int, batch_size: int) -> None:
    for name in metrics:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected a subset of {METRICS}")
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; expected one of {EXTRACTORS}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive token counts, got {ks}")
    if num_images < 2 or batch_size < 1:
        raise ValueError("num_images must be >= 2 and batch_size >= 1")


def _check_scores(scores: list[str], seeds: int, replicates: int, confidence: float) -> None:
    if set(scores) - set(SCORES) or seeds < 1 or replicates < 0 or not 0 < confidence < 1:
        raise ValueError(
            f"feature_scores must be a subset of {SCORES} (got {scores}), seeds >= 1, replicates >= 0 "
            "and 0 < confidence < 1"
        )


class TokenBudgetCallback(pl.Callback):
    """Evaluate PSNR / rFID / gFID, tokens and FLOPs per image at every K in `ks`.

    Args:
        ks: token counts K to evaluate.
        every_n_epochs: evaluate after every n-th training epoch (None: never by epoch).
        every_n_steps: evaluate every n optimizer steps (None: never by step).
        at_fit_end: evaluate when fitting ends (unless that step was just evaluated); also runs
            under `trainer.validate`.
        num_images: images taken from the start of the val dataloader (split over ranks).
        batch_size: fixed evaluation batch size (val batches are re-cut to it).
        metrics: subset of psnr, rfid (reconstruction) and gfid (generation).
        cfg_scales: guidance scales for gfid; several scales give `@k{K}_w{scale}` names.
        extractor: "inception" (needs weights + torch-fidelity) or "proxy" (logged as *_proxy).
        weights: Inception weights file; None looks in the torch hub cache.
        cache_dir: where real statistics are cached (shared across runs).
        dataset_id: names the val set in the cache key; change it when the val data changes.
        resolution: image side for the cache key when the val loader has no images (latents):
            gfid then needs real statistics cached by an image run with the same dataset_id.
        seed: seed of the generation noise (per rank), the same at every evaluation.
        budgets: mean token budgets evaluated in content-adaptive mode (per-image K, see
            `vlt.callbacks.adaptive_budget`); rows get mode "adaptive" (equal mean K) or
            "adaptive-k2" (equal mean K^2, the attention cost of a fixed K = budget).
        budget_costs: which equalities the reconstruction budgets use: "k", "k2" or both.
        budget_distortion: what the reconstruction allocation optimises: "mse" (the set's mean squared
            error; busy images get the tokens) or "neg_psnr" (mean per-image PSNR in dB).
        at_fit_start: also evaluate before the first training step (a "before" curve).
        feature_net: the project's trained feature net (`vlt features`: a vltnet-<hash>.pt file or
            its folder, e.g. data/features); adds `<r|g><score>_vltnet` columns beside rfid/gfid.
        feature_scores: which vltnet scores: fd, kid, precision, recall, class_acc (accuracy of the
            net's hue classifier on images of each class: synthetic data only). Default: all but
            class_acc.
        seeds: generation noise seeds per evaluation; with 2 or more every generation column is the
            mean over seeds with a Student-t interval, with 1 a bootstrap interval.
        replicates: bootstrap resamples of the evaluated images (0: no bootstrap interval).
        confidence: two-sided level of every interval (`<column>_ci` holds its half-width).
        real_shards: image shards whose first `num_images` images are the real side (e.g. the
            synthetic val shards), for runs whose val loader gives latents; default: the val images.
    """

    def __init__(
        self,
        *,
        ks: list[int],
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_fit_end: bool = True,
        num_images: int = 256,
        batch_size: int = 32,
        metrics: list[Metric] | None = None,
        cfg_scales: list[float] | None = None,
        extractor: Extractor = "proxy",
        weights: str | None = None,
        cache_dir: str = "runs/.fid_cache",
        dataset_id: str = "val",
        resolution: int | None = None,
        seed: int = 0,
        budgets: list[float] | None = None,
        budget_costs: list[str] | None = None,
        budget_distortion: str = "mse",
        at_fit_start: bool = False,
        feature_net: str | None = None,
        feature_scores: list[str] | None = None,
        seeds: int = 1,
        replicates: int = 200,
        confidence: float = 0.95,
        real_shards: str | None = None,
    ) -> None:
        super().__init__()
        metrics = ["psnr", "rfid"] if metrics is None else list(metrics)
        _check_args(metrics, extractor, ks, num_images, batch_size)
        self.ks = sorted(set(ks))
        self.budgets = sorted(set(budgets or []))
        self.budget_costs = ["k", "k2"] if budget_costs is None else list(budget_costs)
        check_budgets(self.budgets, self.budget_costs, self.ks)
        to_distortion(0.0, budget_distortion)  # validates the name
        self.budget_distortion = budget_distortion
        self.at_fit_start = at_fit_start
        self.every_n_epochs, self.every_n_steps, self.at_fit_end = every_n_epochs, every_n_steps, at_fit_end
        self.num_images, self.batch_size = num_images, batch_size
        self.metrics = metrics
        self.cfg_scales = [1.0] if cfg_scales is None else list(cfg_scales)
        self.extractor, self.weights = extractor, weights
        self.cache = RealStats(cache_dir=cache_dir)
        self.dataset_id, self.resolution, self.seed = dataset_id, resolution, seed
        scores = ["fd", "kid", "precision", "recall"] if feature_scores is None else list(feature_scores)
        _check_scores(scores, seeds, replicates, confidence)
        self.feature_net, self.feature_scores = feature_net, scores
        self.seeds, self.replicates, self.confidence = seeds, replicates, confidence
        self.real_shards = real_shards
        self.features_cache = RealFeatures(cache_dir=cache_dir)
        # Feature nets are built on first use, on the module's device; never in a checkpoint.
        self.fid = None
        self.vltnet = None
        self._references: tuple = (None, None)
        self._real_key: RealStatsKey | None = None
        self._last_step = -1
        self._warned = False

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        needs = {"psnr": "budget_reconstruct", "rfid": "budget_reconstruct", "gfid": "budget_generate"}
        required = {needs[m] for m in self.metrics} | {"budget_flops", "budget_tokens"}
        if self.budgets and "gfid" in self.metrics:
            required.add("budget_generate_adaptive")  # adaptive generation rows
        missing = sorted(name for name in required if not callable(getattr(pl_module, name, None)))
        if missing:
            raise ValueError(
                f"{type(pl_module).__name__} lacks {missing} needed by TokenBudgetCallback(metrics="
                f"{self.metrics}); see vlt.callbacks.token_budget.BudgetModule"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in self._tensorboards(trainer):
                logger.experiment.add_custom_scalars(self.layout())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, force=True)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, force: bool = False) -> list:
        """Measure every K (all ranks), then log and write the curve (rank zero). Returns the rows."""
        if trainer.sanity_checking or (trainer.global_step == self._last_step and not force):
            return []
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                rows, scalars = self.measure(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        self.publish(trainer, rows, scalars)
        return rows

    def measure(self, trainer: pl.Trainer, pl_module: Any) -> tuple[list[dict], dict[str, float]]:
        rank, world = _world()
        device = pl_module.device
        images, labels = collect_images(trainer, self.num_images // world, self.batch_size)
        scorer = (
            self._prepare_scorer(images, labels, device) if {"rfid", "gfid"} & set(self.metrics) else None
        )
        rows, scalars = [], {}
        base = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        self._curves: dict[int, Tensor] = {}  # K -> this rank's per-image PSNR (B,)
        for k in self.ks:
            row: dict[str, Any] = {**base, "k": k, "mode": "fixed"}
            row["tokens"] = float(pl_module.budget_tokens(k))
            values: dict[str, float] = {}  # column -> value
            if {"psnr", "rfid"} & set(self.metrics):
                values.update(self._reconstruct(trainer, pl_module, scorer, images, labels, k))
                row["flops"] = float(pl_module.budget_flops(k, "reconstruct", 1.0))
            if "gfid" in self.metrics:
                for scale in self.cfg_scales:
                    suffix = f"_w{scale:g}" if len(self.cfg_scales) > 1 else ""
                    values.update(
                        self._generate(trainer, pl_module, scorer, labels, (k, scale), rank, suffix)
                    )
                    column = metric_name("gfid", self.extractor) + suffix
                    row[f"flops_{column}"] = float(pl_module.budget_flops(k, "generate", scale))
                    row.setdefault("flops", row[f"flops_{column}"])
            row.update(values)
            rows.append(row)
            scalars.update(self._scalar_names(row, values))
        if self.budgets and {"psnr", "rfid"} & set(self.metrics):
            curves = torch.stack([self._curves[k] for k in self.ks], dim=1)  # (B, G)
            extra = reconstruction_rows(self, trainer, pl_module, scorer, images, curves, base)
            rows += extra[0]
            scalars.update(extra[1])
        if self.budgets and "gfid" in self.metrics:
            extra = generation_rows(self, trainer, pl_module, scorer, labels, base, rank)
            rows += extra[0]
            scalars.update(extra[1])
        return rows, scalars

    def _prepare_scorer(self, images: list[Tensor], labels: list[Tensor], device: torch.device) -> SetScorer:
        """Feature nets on `device` and the real references (cached on disk, reused while the key holds)."""
        if self.fid is None:
            self.fid = build_fid(self.extractor, self.weights)
        self.fid = self.fid.to(device)
        if self.feature_net is not None and self.vltnet is None:
            self.vltnet = load_vltnet(self.feature_net)
        if self.vltnet is not None:
            self.vltnet = self.vltnet.to(device)
        real, real_labels = self._real_images(images, labels)
        key = self._real_stats_key(real, labels, device)
        if key != self._real_key:
            self.cache.prepare(self.fid, key, real)
            mu, sigma, _ = reduce_real_stats(self.fid)
            vltnet_real = self._real_features(key, real, real_labels, device) if self.vltnet else None
            self._references = ((torch.as_tensor(mu), torch.as_tensor(sigma)), vltnet_real)
            self._real_key = key
        return SetScorer(
            fid_net=self.fid.inception, fid_real=self._references[0], fid_kind=self.extractor,
            vltnet=self.vltnet, vltnet_real=self._references[1], scores=self.feature_scores,
            replicates=self.replicates, confidence=self.confidence, seed=self.seed,
        )  # fmt: skip

    def _real_images(self, images: list[Tensor], labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """This rank's share of the real images: the val images, or all of `real_shards` on rank zero."""
        if not self.real_shards:
            return images, labels if images else []
        side = self.resolution or (images[0].shape[-1] if images else None)
        if side is None:
            raise ValueError("TokenBudgetCallback(real_shards=...) needs resolution=... for latent val data")
        if _world()[0] != 0:
            return [], []
        return read_shard_images(self.real_shards, self.num_images, side, self.batch_size)

    def _real_stats_key(self, real: list[Tensor], labels: list[Tensor], device: torch.device) -> RealStatsKey:
        reduce = self._reduce_device(device)
        # A latent loader has labels but no images: its sample count still names the real set size.
        n_local = sum(len(x) for x in real) if real or self.real_shards else sum(len(y) for y in labels)
        n_total = int(_all_sum([float(n_local)], reduce)[0])
        # A rank may hold no images (exactly-once validation split): agree on the side over ranks.
        side_local = real[0].shape[-1] if real else (self.resolution or 0)
        side = int(_all_max(float(side_local), reduce)) or None
        if side is None:
            raise ValueError("the val dataloader gives no images: set TokenBudgetCallback(resolution=...)")
        key = RealStatsKey(self.dataset_id, self.fid.inception.name, int(side), n_total)
        if (
            key != self._real_key
            and _all_max(1.0 if real else 0.0, reduce) == 0
            and not self.cache.exists(key)
        ):
            raise ValueError(
                f"no real images in the val dataloader and no cached statistics at {self.cache.path(key)}: "
                "set real_shards, or run an image evaluation with the same dataset_id and cache_dir first"
            )
        return key

    def _real_features(
        self, key: RealStatsKey, real: list[Tensor], labels: list[Tensor], device
    ) -> FeatureSet:
        """vltnet features and labels of the real images: from the cache, else computed, gathered, saved."""
        key = RealStatsKey(key.dataset, self.vltnet.name, key.resolution, key.num_images)
        cached = self.features_cache.load(key)
        if cached is None:
            if _all_max(1.0 if real else 0.0, self._reduce_device(device)) == 0:
                raise ValueError(
                    f"no real images for vltnet features and no cache at {self.features_cache.path(key)}: "
                    "set real_shards (the image shards of the val set)"
                )
            feats = [self.vltnet(x.to(device)).double().cpu() for x in real]
            local = (
                torch.cat(feats) if feats else torch.zeros(0, self.vltnet.num_features, dtype=torch.float64)
            )
            local_labels = torch.cat(labels).double()[:, None] if labels else torch.zeros(0, 1)
            features, all_labels = gather_rows(local)[0], gather_rows(local_labels.double())[0][:, 0]
            self.features_cache.save(key, features.numpy(), all_labels.long().numpy())
            cached = (features.numpy(), all_labels.long().numpy())
        return FeatureSet(torch.as_tensor(cached[0]), labels=torch.as_tensor(cached[1]))

    def _reconstruct(self, trainer, pl_module, scorer, images, labels, k: int) -> dict[str, float]:
        if scorer is not None:
            scorer.start()
        total, count, per_image = 0.0, 0, []
        for x, y_label in zip(images, labels):
            x = x.to(pl_module.device)  # (B, 3, H, W)
            with trainer.precision_plugin.forward_context():
                y = pl_module.budget_reconstruct(x, k)
            y = y.float().clamp(-1, 1)  # (B, 3, H, W)
            per_image.append(psnr(y, x).double().cpu())  # (B,)
            total += float(per_image[-1].sum())
            count += len(x)
            if scorer is not None and "rfid" in self.metrics:
                scorer.add(y, y_label)
        self._curves[k] = torch.cat(per_image) if per_image else torch.zeros(0, dtype=torch.float64)
        out = {}
        if "psnr" in self.metrics:
            total, count = _all_sum([total, float(count)], self._reduce_device(pl_module.device))
            out["psnr"] = total / max(count, 1.0)
            # PSNR of the set's mean squared error (the quantity an "mse" allocation maximises).
            err = _all_sum(
                [float(torch.pow(10.0, -self._curves[k] / 10).sum())], self._reduce_device(pl_module.device)
            )
            out["psnr_mse"] = -10 * math.log10(max(err[0] / max(count, 1.0), 1e-10))
        if "rfid" in self.metrics:
            out.update(columns(scorer.finish("r")))
        return out

    def _generate(self, trainer, pl_module, scorer, labels, at: tuple[int, float], rank, suffix) -> dict:
        """Columns of generation at (K, guidance scale): every score, over `seeds` noise seeds."""
        k, scale = at
        per_seed = []
        for s in range(self.seeds):
            generator = torch.Generator(pl_module.device).manual_seed(self.seed + s + 1000 * rank)
            scorer.start()
            for y in labels:
                with trainer.precision_plugin.forward_context():
                    images = pl_module.budget_generate(y.to(pl_module.device), k, scale, generator)
                scorer.add(images, y)
            per_seed.append(scorer.finish("g"))
        return columns(combine(per_seed, self.confidence), suffix)

    @staticmethod
    def _reduce_device(device: torch.device) -> torch.device:
        nccl = _world()[1] > 1 and dist.get_backend() == "nccl"
        return device if nccl else torch.device("cpu")

    @staticmethod
    def _scalar_names(row: Mapping[str, Any], values: Mapping[str, float]) -> dict[str, float]:
        k = row["k"]
        out = {f"budget/tokens@k{k}": row["tokens"], f"budget/tflops@k{k}": row["flops"] / 1e12}
        for column, value in values.items():
            out[scalar_name(column, f"k{k}")] = value
            if f"flops_{column}" in row:
                _, _, scale = column.partition("_w")
                out[f"budget/gen_tflops@k{k}" + (f"_w{scale}" if scale else "")] = (
                    row[f"flops_{column}"] / 1e12
                )
        return out

    # ------------------------------------------------------------ publishing
    def layout(self) -> dict:
        """TensorBoard custom-scalars layout: one multiline chart per series over all K."""
        bases = [m if m == "psnr" else metric_name(m, self.extractor) for m in self.metrics]
        if self.feature_net is not None:
            stages = [s for s, m in (("r", "rfid"), ("g", "gfid")) if m in self.metrics]
            bases += [f"{s}{score}_vltnet" for s in stages for score in self.feature_scores]
        bases += ["tokens", "tflops"] + (["gen_tflops"] if "gfid" in self.metrics else [])
        charts = {base: ["Multiline", [rf"budget/{base}@k\d+.*"]] for base in bases}
        if self.budgets:
            charts.update(
                {f"{base} adaptive": ["Multiline", [rf"budget/{base}@adaptive.*"]] for base in bases}
            )
        return {"token budget": charts}

    def publish(self, trainer: pl.Trainer, rows: list[dict], scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        meta = {"step": trainer.global_step, "epoch": trainer.current_epoch, "extractor": self.extractor}
        write_curve(log_dir or trainer.default_root_dir, rows, meta)
        columns = metric_columns(rows)
        tensorboards = self._tensorboards(trainer)
        if not tensorboards and not self._warned:
            rank_zero_warn("TokenBudgetCallback: no TensorBoard logger; figures skipped, curve files written")
            self._warned = True
        for logger in tensorboards:
            for x in ("tokens", "flops"):
                figure = plot_curves(by_mode(rows, f"step {trainer.global_step}"), columns, x=x)
                logger.experiment.add_figure(f"budget/curve_vs_{x}", figure, trainer.global_step)
            logger.experiment.flush()

    def _tensorboards(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
