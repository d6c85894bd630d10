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
import os
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import webdataset as wds
from lightning.pytorch.callbacks import Callback

from vlt.data.cache import load_allocation, load_ks
from vlt.data.seeds import SeededShuffle, rank_seed, worker_seed
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
from vlt.types import Batch, SkipsOnly

log = logging.getLogger(__name__)
KINDS: tuple[str, ...] = ("images", "latents")
WARN_KEYS = 20  # bad keys named in warnings per run; the count keeps going after that


class WebDataModule(L.LightningDataModule):
    """Reads webdataset shards (local paths, brace or glob patterns, lists, `pipe:` urls).

    Shards are read by webdataset pipelines (shard lists, splitters, shuffle, WebLoader) with vlt's
    own tar reader (`vlt.data.tario`, ~4x faster than tarfile on small images).
    Train: shards resampled with replacement on every rank and worker (no node splitting) and
    exactly `batches_per_epoch` batches per epoch on EVERY rank, because unequal batch counts hang
    DDP. Shard draws, sample shuffling and augmentations derive from `seed`, the rank and the worker,
    so a rerun with the same seed (and the same ranks and workers) reads exactly the same batches.
    Validation: shards split by rank then by worker, read once in order: every sample exactly once
    across ranks and workers; ranks may get different batch counts (Lightning allows that in eval).

    Skipped samples (bad bytes, missing members, bad labels or metadata) are counted in `skipped`
    (this rank's total), shard-level errors (truncated or corrupt shards, failing `pipe:` commands)
    in `shard_errors`; both are warned about with keys or shard names and logged as `data/skipped`
    and `data/shard_errors` by the `SkippedSamples` callback, which `setup()` adds to the trainer
    when it is missing. A training stream in which nothing decodes raises `StreamError` after
    `max_bad_in_a_row` consecutive bad samples or shards, or `max_idle_s` without a sample.

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
        random_flip: random horizontal flips for training images; for training latents, the cached
            latent of the flipped image (`latent_flip.npy`, where the cache has it) drawn 50/50.
        crop: "center" or "random" square crop for training images (validation is always centred).
        seed: seed of shard resampling, sample shuffling and augmentations (mixed with rank, worker
            and epoch); None: the global seed set by `seed_everything` (PL_GLOBAL_SEED), else 0.
        allocation: allocation.json (or its cache folder) written by `vlt allocate`; kind="latents"
            only. Each record gets `k` = K_i by key (k-train.npz for the train loader, k-val.npz for
            val; keys it lacks are skipped and counted) and batches are bucketed by K: at most
            G * (batch_size - 1) records wait in the G buckets of each reader.
        allow_pipe: allow `pipe:` shard urls, which run shell commands (also VLT_ALLOW_PIPE=1).
        max_bad_in_a_row: training stream: consecutive bad samples or shard errors before it fails.
        max_idle_s: training stream: seconds without a decoded sample before it fails (with
            workers, also the loader's timeout for one batch).
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
        seed: int | None = None,
        allocation: str | None = None,
        allow_pipe: bool = False,
        max_bad_in_a_row: int = 1000,
        max_idle_s: float = 600.0,
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
        self.allow_pipe, self.max_bad_in_a_row, self.max_idle_s = allow_pipe, max_bad_in_a_row, max_idle_s
        self.skipped = self.shard_errors = 0
        self._warned = 0
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard specs (a ValueError names a pattern that matches nothing)."""
        self.train_urls = (
            resolve_shards(self.train, allow_pipe=self.allow_pipe) if self.train is not None else None
        )
        self.val_urls = resolve_shards(self.val, allow_pipe=self.allow_pipe) if self.val is not None else None
        if self.allocation is not None:
            load_allocation(self.allocation)  # a missing file fails here, naming `vlt allocate`
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, SkippedSamples) for c in trainer.callbacks):
            trainer.callbacks.append(SkippedSamples())

    @functools.cached_property
    def info(self) -> dict[str, Any] | None:
        """info.json of the first train shard's folder (else val's), or None if there is none."""
        spec = self.train if self.train is not None else self.val
        return shard_info(resolve_shards(spec, allow_pipe=self.allow_pipe)) if spec is not None else None

    @property
    def stream_seed(self) -> int:
        """`seed`, or the global seed of `seed_everything`, or 0."""
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _stages(self, tally: SkipTally, *, train: bool, seed: int) -> list:
        """tar reading, (train: sample shuffle), decode, batch: the stages after the shard list."""
        read = functools.partial(tar_samples, handler=tally.handler)
        shuffle = [SeededShuffle(self.shuffle_buffer, seed)] if train and self.shuffle_buffer > 0 else []
        if self.kind == "images":
            decode = functools.partial(
                decode_images,
                tally=tally,
                size=self.image_size,
                crop=self.crop if train else "center",
                flip=self.random_flip and train,
                seed=seed,
            )
            collate = collate_images
        else:
            flip = self.random_flip and train
            decode = functools.partial(decode_latents, tally=tally, flip=flip, seed=seed)
            collate = collate_latents
        size = self.batch_size if train else self.val_batch_size
        group = batch_records if self.allocation is None else bucket_by_k
        batch = functools.partial(group, batch_size=size, partial=not train, tally=tally, collate=collate)
        if self.allocation is None:
            return [read, *shuffle, decode, batch]
        ks = load_ks(self.allocation, "train" if train else "val")
        return [read, *shuffle, decode, functools.partial(attach_ks, ks=ks, tally=tally), batch]

    def _loader(self, pipeline: wds.DataPipeline, *, timeout: float = 0) -> wds.DataPipeline:
        """The DataLoader, then (in this process) the stage that takes the skip counts off each batch."""
        workers = self.num_workers
        loader = wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            timeout=timeout if workers > 0 else 0,
        )
        return loader.compose(self._account)

    def _account(self, src: Iterator[Batch | SkipsOnly]) -> Iterator[Batch]:
        """Pop the counts the readers attached to each batch; drop skips-only records."""
        for batch in src:
            self.on_after_batch_transfer(batch, 0)
            if not isinstance(batch, SkipsOnly):
                yield batch

    def train_dataloader(self) -> wds.WebLoader:
        if self.train_urls is None:
            raise ValueError("WebDataModule has no train shards: pass train=... and call setup() first")
        tally = SkipTally(max_bad=self.max_bad_in_a_row, max_idle_s=self.max_idle_s)
        # Every rank and worker draws shards with replacement (no node splitting): the stream never
        # ends, so each rank can deliver exactly batches_per_epoch batches.
        seed = rank_seed(self.stream_seed, self._rank()[0])
        shards = wds.ResampledShards(
            self.train_urls, seed=seed, deterministic=True, worker_seed=functools.partial(worker_seed, 0)
        )
        pipeline = wds.DataPipeline(shards, *self._stages(tally, train=True, seed=seed))
        loader = self._loader(pipeline, timeout=self.max_idle_s)
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
            *self._stages(tally, train=False, seed=rank_seed(self.stream_seed, rank)),
        )
        return self._loader(pipeline)

    def _rank(self) -> tuple[int, int]:
        """(rank, world size): the trainer's when attached, else from RANK/WORLD_SIZE or torch.distributed."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        return rank, world_size

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Pop the skip counts the readers attached to the batch (if still there) and count them."""
        skips = getattr(batch, "skips", None)
        if skips is not None:
            batch.skips = None
            self.count_skipped(skips.skipped, skips.notes, shard_errors=skips.shard_errors)
        return batch

    def count_skipped(self, n: int, keys: list[str], *, shard_errors: int = 0) -> None:
        """Add n skipped samples and shard errors; the first WARN_KEYS notes of the run are warned."""
        if n <= 0 and shard_errors <= 0:
            return
        self.skipped += n
        self.shard_errors += shard_errors
        if self._warned < WARN_KEYS:
            shown = keys[: WARN_KEYS - self._warned]
            self._warned += len(shown)
            log.warning(
                "skipped %d bad samples, %d shard errors (totals %d, %d): %s",
                n, shard_errors, self.skipped, self.shard_errors, "; ".join(shown),
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "shard_errors": self.shard_errors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.shard_errors = int(state_dict.get("shard_errors", 0))


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
        for name in ("skipped", "shard_errors"):
            value = getattr(trainer.datamodule, name, None)
            if value is not None:
                pl_module.log(f"data/{name}", float(value), batch_size=1, **kw)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._log(trainer, pl_module, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, on_epoch=True, sync_dist=True, reduce_fx="sum")
