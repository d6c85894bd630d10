"""The evaluated images of a budget evaluation: batches in any common form, re-cut to a fixed size.

Letters: B batch, H/W height/width.

Under DDP each rank passes its own share (a distributed sampler or webdataset's split by node gives
one), so each rank takes its first `n` and the ranks together cover the first `n * world_size`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlt.types import ImageBatch, LatentBatch


def split_batch(batch: Any) -> tuple[Tensor | None, Tensor | None, int]:
    """(images (B, 3, H, W) or None, labels (B,) or None, B) of a batch: vlt's typed batches, or
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
            f"cannot read images from a batch of type {type(batch).__name__}: expected an ImageBatch, "
            "a LatentBatch, an (images, labels) tuple or an image tensor"
        )
    if labels is not None and not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    return images, labels, len(images)


def take_images(batches: Iterable, n: int, batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
    """The first `n` images and labels of `batches` (on CPU), re-cut into batches of `batch_size`.

    Images are empty when the batches hold none (latents); labels are zeros when they hold none.
    """
    images, labels, count = [], [], 0
    for batch in batches:
        x, y, size = split_batch(batch)
        take = min(size, n - count)
        if x is not None:
            images.append(x[:take].detach().float().cpu())
        labels.append(y[:take].cpu() if y is not None else torch.zeros(take, dtype=torch.long))
        count += take
        if count >= n:
            break
    if count < n:
        warnings.warn(f"budget evaluation: the data gave {count} of {n} images on this rank", stacklevel=2)
    cat_images = list(torch.cat(images).split(batch_size)) if images else []
    cat_labels = list(torch.cat(labels).long().split(batch_size)) if labels else []
    return cat_images, cat_labels


def evaluation_set(
    images: Tensor | Iterable | None, labels: Tensor | None, n: int, batch_size: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Images (B, 3, H, W) in [-1, 1] with their labels, a loader (or any iterable of batches), or
    labels alone (generation against cached or `real_shards` statistics) -> `take_images`."""
    if images is None:
        if labels is None:
            raise ValueError("give images (a tensor or a loader of batches), or labels for generation only")
        return [], list(torch.as_tensor(labels).long()[:n].split(batch_size))
    if isinstance(images, Tensor):
        return take_images([(images, labels)], n, batch_size)
    if labels is not None:
        raise ValueError("labels go with an image tensor; a loader's batches carry their own labels")
    return take_images(images, n, batch_size)


def read_shard_images(pattern: str, n: int, size: int, batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
    """The first `n` images (in [-1, 1]) and labels of image shards, in shard order, re-cut into batches.

    For real statistics of a run whose data holds no images (stage-2 latents).
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
        warnings.warn(f"budget evaluation: {pattern} gave {len(arrays)} of {n} real images", stacklevel=2)
    if not arrays:
        return [], []
    images = to_unit_range(np.stack(arrays))  # (N, 3, H, W)
    return list(images.split(batch_size)), list(torch.tensor(labels).long().split(batch_size))
