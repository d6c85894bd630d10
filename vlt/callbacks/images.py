"""TensorBoard pictures of the stage modules: reconstructions across K, merge patterns, samples.

Shaped like Lightning's `ImageSampler` example: typed init, eval mode on, work under no_grad,
restore, write on rank zero only. The pictures use the weights being validated (EMA weights when
the EMA callback swaps them in).
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


def _tensorboard(trainer: pl.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def image_rows(rows: list[Tensor]) -> Tensor:
    """Stack rows of (B, 3, H, W) images in [-1, 1] into one (3, R*H, B*W) picture in [0, 1]."""
    pic = torch.stack(rows)  # (R, B, 3, H, W)
    r, b, c, h, w = pic.shape
    pic = pic.permute(2, 0, 3, 1, 4).reshape(c, r * h, b * w)
    return ((pic.clamp(-1, 1) + 1) / 2).cpu()


def pattern_picture(assign: dict[int, Tensor], cell: int = 8) -> np.ndarray:
    """(H, W, 3) uint8: one row per K, one column per slot, slots of a merged token share a colour.

    Colours follow each cluster's smallest member slot, so nested cuts read as merging stripes.
    """
    ks = sorted(assign)
    n = len(assign[ks[0]])
    hues = np.linspace(0, 1, n, endpoint=False)
    rng = np.random.default_rng(0)
    palette = (np.stack([np.sin(2 * np.pi * (hues + o)) for o in (0, 1 / 3, 2 / 3)], 1) + 1) / 2
    palette = palette[rng.permutation(n)]
    rows = []
    for k in ks:
        a = assign[k].numpy()
        first = np.array([np.flatnonzero(a == a[i]).min() for i in range(n)])
        rows.append(palette[first])
    pic = np.repeat(np.repeat(np.stack(rows), cell, axis=0), cell, axis=1)
    return (pic * 255).astype(np.uint8)


class ReconstructionImages(pl.Callback):
    """After each validation: originals over reconstructions at every validated K, and the merge pattern.

    Args:
        num_images: images per row (taken from the first validation batch).
    """

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images
        self._batch: Tensor | None = None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and self._batch is None:
            self._batch = batch.image[: self.num_images].detach()

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images, self._batch = self._batch, None
        writer = _tensorboard(trainer)
        if images is None or writer is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        rows = [images] + [pl_module.reconstruct(images, k) for k in pl_module.val_ks]
        step = trainer.global_step
        writer.add_image(
            "images/reconstructions (top: input, then K=" + ",".join(map(str, pl_module.val_ks)) + ")",
            image_rows(rows),
            step,
        )
        pattern = pl_module.pattern()
        if pattern is not None:
            writer.add_image(
                "images/merge_pattern (rows: K, columns: slots)",
                pattern_picture({k: pattern.assignment(k).cpu() for k in pattern.ks}),
                step,
                dataformats="HWC",
            )


class SampleImages(pl.Callback):
    """After each validation: a fixed-seed sample grid (one row per K, one column per class) of a LitDiT.

    Args:
        num_classes: classes per row (labels 0..num_classes-1).
        seed: noise seed, fixed so grids are comparable across steps.
        steps: ODE steps (fewer than the default keeps validation cheap).
    """

    def __init__(self, num_classes: int = 8, seed: int = 0, steps: int = 10) -> None:
        self.num_classes, self.seed, self.steps = num_classes, seed, steps

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        model = pl_module.generator
        labels = torch.arange(self.num_classes) % model.dit.cfg.num_classes
        rows = []
        for k in model.ks:
            gen = torch.Generator().manual_seed(self.seed)
            rows.append(model.generate(labels, k, steps=self.steps, generator=gen))
        name = "images/samples (rows: K=" + ",".join(map(str, model.ks)) + ", columns: class)"
        writer.add_image(name, image_rows(rows), trainer.global_step)
