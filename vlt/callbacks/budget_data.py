"""Evaluation images for the token-budget callback: this rank's share of the val dataloader.

Letters: B batch, C channels, H/W height/width.

Under DDP the trainer's val dataloader already yields only this rank's samples (a distributed
sampler, or webdataset's split by node), so each rank takes its first `n` and the ranks together
cover the first `n * world_size` images.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from vlt.types import ImageBatch, LatentBatch


def split_batch(batch: Any) -> tuple[Tensor | None, Tensor | None, int]:
    """(images (B, 3, H, W) or None, labels (B,) or None, B) of a val batch: vlt's typed batches, or
    another datamodule's {"image", "label"} dict, (images, labels) tuple or image tensor."""
    if isinstance(batch, ImageBatch):
        return batch.image, batch.label, len(batch)
    if isinstance(batch, LatentBatch):
        return None, batch.label, len(batch)
    if isinstance(batch, Mapping):  # another datamodule's dict batches: exactly "image" and "label"
        images, labels = batch["image"], batch.get("label")
    elif isinstance(batch, (tuple, list)):
        images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    elif isinstance(batch, Tensor):
        images, labels = batch, None
    else:
        raise ValueError(
            f"cannot read images from a val batch of type {type(batch).__name__}: expected an ImageBatch, "
            "a LatentBatch, an (images, labels) tuple or an image tensor"
        )
    if labels is not None and not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    return images, labels, len(images)


def _val_loader(trainer: pl.Trainer) -> Iterable:
    loaders = trainer.val_dataloaders
    if loaders is None:  # no validation has run yet: let the loop build its (distributed) loader
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        except Exception:  # pragma: no cover - falls back to the datamodule below
            loaders = None
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if loaders is None:
        raise ValueError("TokenBudgetCallback needs a val dataloader (the datamodule's val_dataloader)")
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0]
    elif isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()))
    return loaders


def collect_images(trainer: pl.Trainer, n: int, batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
    """This rank's first `n` val images and labels (on CPU), re-cut into batches of `batch_size`.

    Images are empty when the loader gives none (latents); labels are zeros when it gives none.
    """
    images, labels, count = [], [], 0
    for batch in _val_loader(trainer):
        x, y, size = split_batch(batch)
        take = min(size, n - count)
        if x is not None:
            images.append(x[:take].detach().float().cpu())
        labels.append(y[:take].cpu() if y is not None else torch.zeros(take, dtype=torch.long))
        count += take
        if count >= n:
            break
    if count < n:
        warnings.warn(f"TokenBudgetCallback: val data gave {count} of {n} images on this rank", stacklevel=2)
    cat_images = list(torch.cat(images).split(batch_size)) if images else []
    cat_labels = list(torch.cat(labels).long().split(batch_size)) if labels else []
    return cat_images, cat_labels
