"""Token-budget curves during training: when to evaluate, on what, and where the curve goes.

The evaluation itself is `vlt.metrics.budget.BudgetEvaluator` (runs without a Trainer); this callback
decides when (epochs, steps, fit start/end, `trainer.validate`), feeds it each rank's share of the
first `num_images` val images, and publishes on rank zero: per-K scalars, figures and a custom-scalars
layout to TensorBoard, and the curve as CSV/JSON under `trainer.log_dir/curves/` (read by `vlt curves`).
The evaluator owns the feature networks, so they never land in model checkpoints.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from vlt.callbacks.averaging import averaged_weights
from vlt.callbacks.budget_data import collect_images
from vlt.callbacks.curves import by_mode, metric_columns, plot_curves, write_curve
from vlt.metrics.budget import BudgetEvaluator, BudgetModule, Metric, budget_scalars
from vlt.metrics.budget.distributed import world
from vlt.metrics.fid import Extractor, metric_name

__all__ = ["BudgetModule", "TokenBudgetCallback"]


class TokenBudgetCallback(pl.Callback):
    """Evaluate PSNR / rFID / gFID, tokens and FLOPs per image at every K in `ks`.

    Args:
        every_n_epochs: evaluate after every n-th training epoch (None: never by epoch).
        every_n_steps: evaluate every n optimizer steps (None: never by step).
        at_fit_end: evaluate when fitting ends (unless that step was just evaluated); also runs
            under `trainer.validate`.
        at_fit_start: also evaluate before the first training step (a "before" curve).
        num_images: images taken from the start of the val dataloader (split over ranks).
        batch_size: fixed evaluation batch size (val batches are re-cut to it).
        resolution: image side for the cache key when the val loader has no images (latents):
            gfid then needs real statistics cached by an image run with the same dataset_id.
        real_shards: image shards whose first `num_images` images are the real side (e.g. the
            synthetic val shards), for runs whose val loader gives latents; default: the val images.
        The other arguments are `vlt.metrics.budget.BudgetSettings`' (metrics, cfg_scales, extractor,
        weights, cache_dir, dataset_id, seed, budgets, budget_costs, budget_distortion, feature_net,
        feature_scores, seeds, replicates, confidence, targets, target_shares).
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
        cfg_scales: list[float | Literal["config"]] | None = None,
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
        targets: list[float] | None = None,
        target_shares: list[float] | None = None,
    ) -> None:
        super().__init__()
        given = {"metrics": metrics, "cfg_scales": cfg_scales, "budgets": budgets}
        given |= {"budget_costs": budget_costs, "feature_scores": feature_scores}
        given |= {"targets": targets, "target_shares": target_shares}
        self.evaluator = BudgetEvaluator(
            ks=ks, num_images=num_images, batch_size=batch_size, extractor=extractor, weights=weights,
            cache_dir=cache_dir, dataset_id=dataset_id, resolution=resolution, seed=seed,
            budget_distortion=budget_distortion, feature_net=feature_net, seeds=seeds,
            replicates=replicates, confidence=confidence, real_shards=real_shards,
            **{key: list(value) for key, value in given.items() if value is not None},
        )  # fmt: skip
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.at_fit_start, self.at_fit_end = at_fit_start, at_fit_end
        self._last_step = -1
        self._warned = False

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.evaluator.check(pl_module)
        self.evaluator.check_files()

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
        settings = self.evaluator
        images, labels = collect_images(trainer, settings.num_images // world()[1], settings.batch_size)
        with averaged_weights(trainer, pl_module):  # the weights validation and the fit-end curve measure
            rows = settings.evaluate_batches(
                pl_module, images, labels, step=trainer.global_step, epoch=trainer.current_epoch,
                autocast=trainer.precision_plugin.forward_context,
            )  # fmt: skip
        self.publish(trainer, rows)
        return rows

    # ------------------------------------------------------------ publishing
    def layout(self) -> dict:
        """TensorBoard custom-scalars layout: one multiline chart per series over all K."""
        settings = self.evaluator
        bases = [m if m == "psnr" else metric_name(m, settings.extractor) for m in settings.metrics]
        if settings.feature_net is not None:
            stages = [s for s, m in (("r", "rfid"), ("g", "gfid")) if m in settings.metrics]
            bases += [f"{s}{score}_vltnet" for s in stages for score in settings.feature_scores]
        bases += ["tokens", "tflops"] + (["gen_tflops"] if "gfid" in settings.metrics else [])
        charts = {base: ["Multiline", [rf"budget/{base}@k\d+.*"]] for base in bases}
        if settings.budgets:
            charts.update(
                {f"{base} adaptive": ["Multiline", [rf"budget/{base}@adaptive.*"]] for base in bases}
            )
        return {"token budget": charts}

    def publish(self, trainer: pl.Trainer, rows: list[dict]) -> None:
        scalars = budget_scalars(rows)
        for name, value in scalars.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        meta = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "extractor": self.evaluator.extractor,
        }
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
