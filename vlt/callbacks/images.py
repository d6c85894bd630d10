"""Pictures of the stage modules: reconstructions across K, the merge pattern, samples per K and class.

Shaped like Lightning's `ImageSampler` example: typed init, eval mode on, work under no_grad,
restore, write on rank zero only. The pictures are drawn at the first validation batch, where the
module holds the weights being validated (the EMA average when `EMAWeightAveraging` is on): at
`on_validation_epoch_end` it may already hold the training weights again, because the averaging
callback swaps back in its own epoch-end hook and callbacks run in list order. Each is a labelled
panel (`vlt.panels`, tiles of at least 128 px) logged to TensorBoard and saved as PNG under
<run>/panels/ (the latest as `<name>.png`, and `<name>_step<N>.png`).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from vlt.data.transforms import to_uint8
from vlt.panels import panel, pattern_panel, save_png


def _tensorboard(trainer: pl.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def publish(trainer: pl.Trainer, run_dir: str, name: str, tag: str, picture: np.ndarray) -> None:
    """One panel to TensorBoard (under `tag`) and to <run>/panels/<name>.png and <name>_step<N>.png."""
    step = trainer.global_step
    writer = _tensorboard(trainer)
    if writer is not None:
        writer.add_image(tag, picture, step, dataformats="HWC")
    folder = Path(run_dir) / "panels"
    save_png(picture, folder / f"{name}.png")
    save_png(picture, folder / f"{name}_step{step}.png")


def class_names(labels: Tensor, names: list[str] | None) -> list[str]:
    return [names[i] if names and i < len(names) else f"class {i}" for i in labels.tolist()]


class ReconstructionImages(pl.Callback):
    """After each validation: originals over reconstructions at every validated K, and the merge pattern.

    Args:
        num_images: images per row (taken from the first validation batch).
    """

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images
        self._picture: np.ndarray | None = None
        self._pattern: np.ndarray | None = None

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not _draws_now(trainer, batch_idx, self._picture):
            return
        images, labels = batch.image[: self.num_images].detach(), batch.label[: self.num_images].detach()
        rows = [images] + [pl_module.reconstruct(images, k) for k in pl_module.val_ks]
        self._picture = panel(
            [to_uint8(r) for r in rows],
            row_labels=["input"] + [f"K={k}" for k in pl_module.val_ks],
            col_labels=class_names(labels, _classes(trainer)),
            title=f"reconstructions at step {trainer.global_step} (EMA weights when EMA is on)",
        )
        pattern = pl_module.pattern()
        if pattern is not None:
            self._pattern = pattern_panel({k: pattern.assignment(k).cpu().numpy() for k in pattern.ks})

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank must ask
        picture, pattern, self._picture, self._pattern = self._picture, self._pattern, None, None
        if picture is None:
            return
        publish(trainer, run_dir, "reconstructions", "images/reconstructions", picture)
        if pattern is not None:
            publish(trainer, run_dir, "merge_pattern", "images/merge_pattern", pattern)


class SampleImages(pl.Callback):
    """After each validation: a fixed-seed sample grid (one row per K, one column per class) of a LitDiT.

    Args:
        num_classes: classes per row (labels 0..num_classes-1).
        seed: noise seed, fixed so grids are comparable across steps.
        steps: ODE steps (fewer than the default keeps validation cheap).
    """

    def __init__(self, num_classes: int = 8, seed: int = 0, steps: int = 10) -> None:
        self.num_classes, self.seed, self.steps = num_classes, seed, steps
        self._picture: np.ndarray | None = None

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not _draws_now(trainer, batch_idx, self._picture):
            return
        model = pl_module.generator
        labels = torch.arange(self.num_classes) % model.dit.cfg.num_classes
        rows = []
        for k in model.ks:
            gen = torch.Generator().manual_seed(self.seed)
            rows.append(to_uint8(model.generate(labels, k, steps=self.steps, generator=gen)))
        self._picture = panel(
            rows,
            row_labels=[f"K={k}" for k in model.ks],
            col_labels=class_names(labels, _classes(trainer)),
            title=f"samples at step {trainer.global_step}, seed {self.seed}, {self.steps} steps",
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank must ask
        picture, self._picture = self._picture, None
        if picture is not None:
            publish(trainer, run_dir, "samples", "images/samples", picture)


def _draws_now(trainer: pl.Trainer, batch_idx: int, pending: np.ndarray | None) -> bool:
    """Draw at the first batch of a real validation, on rank zero, once per validation."""
    return batch_idx == 0 and pending is None and trainer.is_global_zero and not trainer.sanity_checking


def _classes(trainer: pl.Trainer) -> list[str] | None:
    """Class names of the run's data (its info.json), when the datamodule has them."""
    info = getattr(trainer.datamodule, "info", None) if trainer.datamodule is not None else None
    names = info.get("classes") if isinstance(info, dict) else None
    return list(names) if names else None
