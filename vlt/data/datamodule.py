"""WebDataModule: webdataset shards -> batches, safe under DDP; SkippedSamples logs what was dropped.

Letters: B batch, H, W image side (image_size), N latent slots, C latent channels.

Batches are dicts. kind="images": {"image": (B, 3, H, W) float32 in [-1, 1], "label": (B,) long,
"complexity": (B,) long, "key": list[str]}. kind="latents": {"latent": (B, N, C) float32, "label",
"complexity", "k": (B,) long (-1 if absent), "key"}. Decoding and collation run inside the loader
workers (the DataLoader itself has batch_size=None), so the main process only receives tensors.

With an `allocation` (content-adaptive K), latent batches are bucketed by K_i: every batch holds one
K (no padding), train still yields exactly `batches_per_epoch` batches per rank, and validation still
reads every sample exactly once (the partial buckets are flushed at the end of each reader's stream).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import webdataset as wds
from lightning.pytorch.callbacks import Callback

from vlt.data.cache import load_allocation, load_ks
from vlt.data.shards import resolve_shards, shard_info
from vlt.data.stream import (
    SkipTally,
    attach_ks,
    batch_records,
    bucket_by_k,
    collate_images,
    collate_latents,
    decode_images,
    decode_latents,
)
from vlt.data.tario import tar_samples
from vlt.data.transforms import check_crop

log = logging.getLogger(__name__)
KINDS: tuple[str, ...] = ("images", "latents")
WARN_KEYS = 20  # bad keys named in warnings per run; the count keeps going after that


class WebDataModule(L.LightningDataModule):
    """Reads webdataset shards (local paths, brace or glob patterns, lists, `pipe:` urls).

    Shards are read by webdataset pipelines (shard lists, splitters, shuffle, WebLoader) with vlt's
    own tar reader (`vlt.data.tario`, ~4x faster than tarfile on small images).
    Train: shards resampled with replacement on every rank and worker (no node splitting) and
    exactly `batches_per_epoch` batches per epoch on EVERY rank, because unequal batch counts hang
    DDP. The stream is not bit-reproducible (shard draws use fresh randomness).
    Validation: shards split by rank then by worker, read once in order: every sample exactly once
    across ranks and workers; ranks may get different batch counts (Lightning allows that in eval).

    Skipped samples (bad bytes, missing members) are counted in `skipped` (this rank's total), warned
    about with their keys, and logged as `data/skipped` by the `SkippedSamples` callback, which
    `setup()` adds to the trainer when it is missing.

    Args:
        train: shard spec of the training set (None: no train loader).
        val: shard spec of the validation set (None: no val loader).
        kind: "images" (decoded and transformed) or "latents" (`latent.npy` arrays, stage 2).
        image_size: output side; the short side is resized to it, then a square crop.
        batch_size: training batch size per rank.
        val_batch_size: validation batch size (None: batch_size).
        num_workers: loader worker processes per rank (0: decode in the main process).
        batches_per_epoch: training batches per epoch on every rank.
        shuffle_buffer: samples in the training shuffle buffer (0: no sample shuffling).
        random_flip: random horizontal flips for training images.
        crop: "center" or "random" square crop for training images (validation is always centred).
        seed: seed of the augmentation random numbers (mixed with rank and worker).
        allocation: allocation.json (or its cache folder) written by `vlt allocate`; kind="latents"
            only. Each record gets `k` = K_i by key (k-train.npz for the train loader, k-val.npz for
            val; keys it lacks are skipped and counted) and batches are bucketed by K: at most
            G * (batch_size - 1) records wait in the G buckets of each reader.
    """

    def __init__(
        self,
        *,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        kind: Literal["images", "latents"] = "images",
        image_size: int = 32,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        batches_per_epoch: int = 100,
        shuffle_buffer: int = 1000,
        random_flip: bool = True,
        crop: Literal["center", "random"] = "center",
        seed: int = 0,
        allocation: str | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not supported; choose one of {KINDS}")
        check_crop(crop)
        if batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(
                f"batch_size={batch_size} and batches_per_epoch={batches_per_epoch} must be >= 1"
            )
        if allocation is not None and kind != "latents":
            raise ValueError(f"allocation applies to kind='latents' only, got kind={kind!r}")
        self.save_hyperparameters()
        self.allocation = allocation
        self.train, self.val, self.kind = train, val, kind
        self.image_size, self.batch_size = image_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.random_flip, self.crop, self.seed = shuffle_buffer, random_flip, crop, seed
        self.skipped = 0
        self._warned = 0
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard specs (a ValueError names a pattern that matches nothing)."""
        self.train_urls = resolve_shards(self.train) if self.train is not None else None
        self.val_urls = resolve_shards(self.val) if self.val is not None else None
        if self.allocation is not None:
            load_allocation(self.allocation)  # a missing file fails here, naming `vlt allocate`
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, SkippedSamples) for c in trainer.callbacks):
            trainer.callbacks.append(SkippedSamples())

    @functools.cached_property
    def info(self) -> dict[str, Any] | None:
        """info.json of the first train shard's folder (else val's), or None if there is none."""
        spec = self.train if self.train is not None else self.val
        return shard_info(resolve_shards(spec)) if spec is not None else None

    def _stages(self, tally: SkipTally, *, train: bool) -> list:
        """tar reading, (train: sample shuffle), decode, batch: the stages after the shard list."""
        read = functools.partial(tar_samples, handler=tally.handler)
        shuffle = [wds.shuffle(self.shuffle_buffer)] if train and self.shuffle_buffer > 0 else []
        if self.kind == "images":
            decode = functools.partial(
                decode_images,
                tally=tally,
                size=self.image_size,
                crop=self.crop if train else "center",
                flip=self.random_flip and train,
                seed=self.seed,
            )
            collate = collate_images
        else:
            decode, collate = functools.partial(decode_latents, tally=tally), collate_latents
        size = self.batch_size if train else self.val_batch_size
        group = batch_records if self.allocation is None else bucket_by_k
        batch = functools.partial(group, batch_size=size, partial=not train, tally=tally, collate=collate)
        if self.allocation is None:
            return [read, *shuffle, decode, batch]
        ks = load_ks(self.allocation, "train" if train else "val")
        return [read, *shuffle, decode, functools.partial(attach_ks, ks=ks, tally=tally), batch]

    def _loader(self, pipeline: wds.DataPipeline) -> wds.WebLoader:
        workers = self.num_workers
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> wds.WebLoader:
        if self.train_urls is None:
            raise ValueError("WebDataModule has no train shards: pass train=... and call setup() first")
        tally = SkipTally()
        # Every rank and worker draws shards with replacement (no node splitting): the stream never
        # ends, so each rank can deliver exactly batches_per_epoch batches.
        pipeline = wds.DataPipeline(wds.ResampledShards(self.train_urls), *self._stages(tally, train=True))
        loader = self._loader(pipeline)
        # with_epoch on the loader (not the dataset) counts batches of all workers together
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)

    def val_dataloader(self) -> wds.WebLoader:
        if self.val_urls is None:
            raise ValueError("WebDataModule has no val shards: pass val=... and call setup() first")
        tally = SkipTally()
        # Shards split by rank, then by worker: every sample once. Readers left without a shard
        # (fewer shards than ranks x workers) simply yield nothing. The rank is read HERE, in the
        # rank's own process: inside loader workers (under ddp_spawn, for one) webdataset's own
        # detection can miss the process group and let every rank read every shard.
        rank, world_size = self._rank()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            functools.partial(take_every, start=rank, step=world_size),
            wds.split_by_worker,
            *self._stages(tally, train=False),
        )
        return self._loader(pipeline)

    def _rank(self) -> tuple[int, int]:
        """(rank, world size): the trainer's when attached, else from RANK/WORLD_SIZE or torch.distributed."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        return rank, world_size

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Pop the skip count the workers attached to the batch, add it to `skipped`, warn with keys."""
        if isinstance(batch, dict) and "n_skipped" in batch:
            n, keys = int(batch.pop("n_skipped")), batch.pop("skipped_keys", [])
            self.count_skipped(n, keys)
        return batch

    def count_skipped(self, n: int, keys: list[str]) -> None:
        """Add n skipped samples; the first WARN_KEYS bad keys of the run are named in a warning."""
        if n <= 0:
            return
        self.skipped += n
        if self._warned < WARN_KEYS:
            shown = keys[: WARN_KEYS - self._warned]
            self._warned += len(shown)
            log.warning("skipped %d bad samples (total %d): %s", n, self.skipped, "; ".join(shown))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def take_every(src: Iterator[Any], *, start: int, step: int) -> Iterator[Any]:
    """Items start, start + step, ... of a stream: one rank's share of the shard list."""
    yield from itertools.islice(src, start, None, step)


class SkippedSamples(Callback):
    """Logs the datamodule's skip count as `data/skipped` through the LightningModule's logger.

    Every training step it logs this rank's running total (the logger shows rank zero's, no
    collective call per step); at the end of each validation epoch the totals of all ranks summed,
    so a validate-only run reports it too.
    """

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, **kw: Any) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is not None:
            pl_module.log("data/skipped", float(skipped), batch_size=1, **kw)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._log(trainer, pl_module, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, on_epoch=True, sync_dist=True, reduce_fx="sum")
