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
import numpy as np
import torch
import torch.distributed as dist
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


def read_shard_images(pattern: str, n: int, size: int, batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
    """The first `n` images (in [-1, 1]) and labels of image shards, in shard order, re-cut into batches.

    For real statistics of a run whose val loader holds no images (stage-2 latents).
    """
    from vlt.data.shards import resolve_shards
    from vlt.data.tario import tar_samples
    from vlt.data.transforms import image_array, to_unit_range

    arrays, labels = [], []
    for sample in tar_samples({"url": url} for url in resolve_shards(pattern)):
        ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
        if ext is None:
            continue
        arrays.append(image_array(sample[ext], size))
        labels.append(int(sample["cls"].decode().strip()) if "cls" in sample else -1)
        if len(arrays) >= n:
            break
    if len(arrays) < n:
        warnings.warn(f"TokenBudgetCallback: {pattern} gave {len(arrays)} of {n} real images", stacklevel=2)
    if not arrays:
        return [], []
    images = to_unit_range(np.stack(arrays))  # (N, 3, H, W)
    return list(images.split(batch_size)), list(torch.tensor(labels).long().split(batch_size))


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate (B, G) tensors of every rank (B may differ): (T, G) and this rank's first row.

    A rank with no rows may not know G (an exactly-once val split can leave it no sample): the ranks
    agree on the widest G first and gather in float64, so every all_gather moves one shape and dtype.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    backend_device = x.device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = x.to(backend_device, torch.float64)  # (B, G): one dtype on every rank (an empty one has none)
    shape = torch.tensor([len(local), local.shape[1] if len(local) else 0], device=backend_device)
    sizes = [torch.zeros(2, dtype=torch.long, device=backend_device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, shape)
    counts, width = [int(s[0]) for s in sizes], max(int(s[1]) for s in sizes)
    if not len(local):
        local = local.new_zeros(0, width)
    padded = torch.zeros(max(counts), width, dtype=local.dtype, device=backend_device)
    padded[: len(local)] = local
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    offset = sum(counts[: dist.get_rank()])
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device, x.dtype), offset
