"""`vlt cache-latents` on Lightning's predict loop: any accelerator, DDP, Slurm, resumable by image shard.

Letters: B images of a batch, N slots, C channels, G levels of the merge grid, H, W image side.

    UnitBatches   this rank's image shards ("units") that have no finished latent shard yet, as batches
                  that never span two units (the last batch of a unit says so)
    CacheData     the predict loader of the rank the Trainer runs as; rank zero prepares the folder
    LitCacher     the tokenizer in a LightningModule: predict_step = encode one batch (+ flipped, + curves)
    UnitWriter    Lightning's prediction writer: streams each unit into a temporary tar, renames it into
                  place after the unit's last batch, then writes the unit's record (`LatentCache`)

Unit u (image shard u of the sorted shard list) belongs to rank u % world size and holds the same
images, in the same batches, whatever the number of processes: 1 or 8 processes write the same latents,
and a restarted job (any number of processes) makes only the units without a record.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlt.adaptive.distortion import png_size, psnr_curves
from vlt.data.cache import Curves, LatentCache
from vlt.data.labels import check_labels
from vlt.data.stream import SkipTally, batch_records, collate_images, decode_images
from vlt.data.tario import tar_samples
from vlt.data.transforms import to_uint8
from vlt.paths import temporary_name
from vlt.stages import VariableLengthTokenizer
from vlt.types import ImageBatch

log = logging.getLogger(__name__)


def rank_units(n_units: int, rank: int, world: int) -> list[int]:
    """The units of one rank: u % world == rank."""
    return list(range(rank, n_units, world))


class UnitBatches(IterableDataset):
    """Batches of the given units, each a dict: unit, last (the unit's final batch), image (B, 3, H, W) in
    [-1, 1], label (B,), complexity (B,), key (B,), skipped / shard_errors / notes since the previous one.

    A unit in which nothing decodes still yields one (empty, last) batch, so its record is written.
    Loader workers take every W-th unit; bad samples are skipped and counted (`vlt.data.stream`).
    """

    def __init__(self, urls: list[str], units: list[int], *, image_size: int, batch_size: int) -> None:
        self.urls, self.units = urls, units
        self.image_size, self.batch_size = image_size, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        mine = self.units if worker is None else self.units[worker.id :: worker.num_workers]
        for unit in mine:
            yield from self._unit(unit)

    def _unit(self, unit: int) -> Iterator[dict[str, Any]]:
        tally = SkipTally()
        read = functools.partial(tar_samples, handler=tally.handler)
        decode = functools.partial(
            decode_images, tally=tally, size=self.image_size, crop="center", flip=False, seed=0
        )
        group = functools.partial(
            batch_records, batch_size=self.batch_size, partial=True, tally=tally, collate=collate_images
        )
        previous: dict[str, Any] | None = None
        for batch in group(decode(read(iter([{"url": self.urls[unit]}])))):
            item = self._item(unit, batch)
            if previous is not None and isinstance(batch, ImageBatch):
                yield previous
            elif previous is not None:  # a skips-only record: its counts join the unit's last batch
                item = {
                    **previous,
                    **{k: previous[k] + item[k] for k in ("skipped", "shard_errors", "notes")},
                }
            previous = item
        yield {**(previous or self._item(unit, None)), "last": True}

    def _item(self, unit: int, batch: Any) -> dict[str, Any]:
        skips = batch.skips if batch is not None else None
        item = {"unit": unit, "last": False, "skipped": 0, "shard_errors": 0, "notes": []}
        if skips is not None:
            item |= {"skipped": skips.skipped, "shard_errors": skips.shard_errors, "notes": list(skips.notes)}
        if isinstance(batch, ImageBatch):
            return item | {
                "image": batch.image,
                "label": batch.label,
                "complexity": batch.complexity,
                "key": batch.key,
            }
        empty = torch.zeros(0, 3, self.image_size, self.image_size)
        return item | {
            "image": empty,
            "label": torch.zeros(0, dtype=torch.long),
            "complexity": torch.zeros(0, dtype=torch.long),
            "key": [],
        }


class CacheData(pl.LightningDataModule):
    """The predict loader of this rank (built once the Trainer knows rank and world size).

    Args:
        cache: the output folder.
        split: the split's name.
        urls: the image shards, in order (unit u = urls[u]).
        settings: what decides the latents (`LatentCache.check_run`), recorded by `prepare_data`.
        resume: keep the finished units of an earlier run (`LatentCache.check_run`'s verdict).
        image_size, batch_size, num_workers: decoding and batching.
    """

    def __init__(
        self,
        cache: LatentCache,
        split: str,
        urls: list[str],
        settings: dict[str, Any],
        *,
        resume: bool,
        image_size: int,
        batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        self.prepare_data_per_node = False  # one process prepares the (shared) output folder
        self.cache, self.split, self.urls, self.settings, self.resume = cache, split, urls, settings, resume
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.pending: list[int] = []

    def prepare_data(self) -> None:
        """Start over or keep the finished units; Lightning's barrier follows before any rank lists them."""
        self.cache.prepare(self.split, self.settings, resume=self.resume)

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        units = rank_units(len(self.urls), rank, world)
        self.pending = [u for u in units if not self.cache.unit_done(self.split, u)]
        data = UnitBatches(self.urls, self.pending, image_size=self.image_size, batch_size=self.batch_size)
        # Items are whole batches of one unit (no batch sampler whose indices Lightning could report).
        warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices fetched")
        warnings.filterwarnings("ignore", message=".*predict_dataloader' does not have many workers")
        workers = min(self.num_workers, len(self.pending))  # a worker without a unit would idle
        return DataLoader(data, batch_size=None, num_workers=workers)


class LitCacher(pl.LightningModule):
    """Encodes batches with a VariableLengthTokenizer (autocast as the Trainer's precision says).

    Args:
        tokenizer: the stage-1 tokenizer (eval mode).
        flip: also encode each horizontally flipped image.
        grid: K values to reconstruct at for the PSNR curves ([]: none).
    """

    def __init__(self, tokenizer: VariableLengthTokenizer, *, flip: bool, grid: list[int]) -> None:
        super().__init__()
        self.tokenizer = tokenizer.eval()
        self.flip, self.grid = flip, grid

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        images = batch["image"]  # (B, 3, H, W)
        out = {key: batch[key] for key in ("unit", "last", "key", "skipped", "shard_errors", "notes")}
        out |= {"label": batch["label"].cpu(), "complexity": batch["complexity"].cpu()}
        if len(images) == 0:
            return out | {"z": None, "z_flip": None, "psnr": None, "png_bytes": None}
        z = self.tokenizer.encode(images)  # (B, N, C)
        z_flip = self.tokenizer.encode(images.flip(-1)) if self.flip else None  # (B, N, C)
        curves = psnr_curves(self.tokenizer, images, self.grid, z=z) if self.grid else None  # (B, G)
        pixels = to_uint8(images) if self.grid else None  # (B, H, W, 3)
        return out | {
            "z": z.float().cpu(),
            "z_flip": z_flip.float().cpu() if z_flip is not None else None,
            "psnr": curves.float().cpu().numpy() if curves is not None else None,
            "png_bytes": [png_size(p) for p in pixels] if pixels is not None else None,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Slurm's requeue signal makes Lightning save an hpc checkpoint even in predict: keep it small.
        Nothing in it is read back (a requeued job resumes from the unit records)."""
        checkpoint["state_dict"] = {}


@dataclass
class _Open:
    """A unit being written: its shard (final name), the temporary tar, running totals (C,) and rows."""

    shard: Path
    tar: wds.TarWriter
    total: torch.Tensor
    total_sq: torch.Tensor
    samples: int = 0
    skipped: int = 0
    shard_errors: int = 0
    notes: list[str] = field(default_factory=list)
    rows: dict[str, list] = field(default_factory=lambda: {name: [] for name in Curves._fields[:-1]})


class UnitWriter(BasePredictionWriter):
    """Writes predicted batches into their unit's latent shard; finishes a unit after its last batch.

    Args:
        cache, split: where to write; urls: the image shards (unit u = urls[u]).
        channels: C of the latents (the channel sums of a unit without samples are zeros).
        classes: labels must lie in [0, classes) (None: unchecked).
        grid: the K values of the PSNR curves ([]: none).
    """

    def __init__(
        self,
        cache: LatentCache,
        split: str,
        urls: list[str],
        *,
        channels: int,
        classes: int | None,
        grid: list[int],
    ) -> None:
        super().__init__(write_interval="batch")
        self.cache, self.split, self.urls = cache, split, urls
        self.channels, self.classes, self.grid = channels, classes, grid
        self.open: dict[int, _Open] = {}
        self.units = self.images = 0
        self.started = self.finished = 0.0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.finished = time.perf_counter()  # after start-up: the rate is encoding's own

    @property
    def images_per_second(self) -> float:
        return self.images / (self.finished - self.started) if self.finished > self.started else 0.0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dl_idx):
        p, index = prediction, prediction["unit"]
        check_labels(p["label"], self.classes, where=f"cache-latents of {self.urls[index]}", keys=p["key"])
        unit = self.open.get(index) or self._begin(index, trainer.global_rank)
        self._add(unit, p)
        self.images += len(p["key"])
        if p["last"]:
            self._finish(index, self.open.pop(index))
        self.finished = time.perf_counter()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the open tars; their temporary files are never renamed (a restart removes them)."""
        for unit in self.open.values():
            unit.tar.close()
        self.open.clear()

    def _begin(self, index: int, rank: int) -> _Open:
        self.cache.begin_unit(self.split, index)
        shard = self.cache.unit_shard(self.split, rank, index)
        zeros = functools.partial(torch.zeros, self.channels, dtype=torch.float64)
        tar = wds.TarWriter(str(temporary_name(shard)), mtime=0)  # closes its file on close()
        self.open[index] = _Open(shard=shard, tar=tar, total=zeros(), total_sq=zeros())
        return self.open[index]

    def _add(self, unit: _Open, p: dict[str, Any]) -> None:
        unit.skipped += p["skipped"]
        unit.shard_errors += p["shard_errors"]
        unit.notes = (unit.notes + list(p["notes"]))[:8]
        if p["z"] is None:
            return
        z = p["z"].double()  # (B, N, C)
        unit.total += z.sum(dim=(0, 1))
        unit.total_sq += z.pow(2).sum(dim=(0, 1))
        for i, key in enumerate(p["key"]):
            meta = {"label": int(p["label"][i]), "complexity": int(p["complexity"][i]), "key": key}
            if p["psnr"] is not None:
                meta |= {"psnr": [float(v) for v in p["psnr"][i]], "png_bytes": int(p["png_bytes"][i])}
                for name in unit.rows:
                    unit.rows[name].append(meta["key" if name == "keys" else name])
            sample = {
                "__key__": key,
                "latent.npy": p["z"][i].numpy(),
                "cls": str(meta["label"]),
                "json": meta,
            }
            if p["z_flip"] is not None:
                sample["latent_flip.npy"] = p["z_flip"][i].numpy()
            unit.tar.write(sample)
        unit.samples += len(p["key"])

    def _finish(self, index: int, unit: _Open) -> None:
        """Rename the shard into place (none for a unit without samples), then write the record."""
        unit.tar.close()
        tmp = temporary_name(unit.shard)
        if unit.samples:
            os.replace(tmp, unit.shard)
        else:
            tmp.unlink()
        if unit.skipped or unit.shard_errors:
            log.warning(
                "%s: skipped %d samples, %d shard errors: %s",
                self.urls[index], unit.skipped, unit.shard_errors, "; ".join(unit.notes),
            )  # fmt: skip
        record = {
            "unit": index, "url": self.urls[index], "shard": unit.shard.name if unit.samples else None,
            "samples": unit.samples, "skipped": unit.skipped, "shard_errors": unit.shard_errors,
            "sum": unit.total.tolist(), "sum_sq": unit.total_sq.tolist(),
        }  # fmt: skip
        curves = None
        if self.grid:
            rows = {name: np.asarray(values) for name, values in unit.rows.items() if name != "keys"}
            rows["psnr"] = rows["psnr"].astype(np.float32).reshape(unit.samples, len(self.grid))
            curves = Curves(keys=unit.rows["keys"], grid=self.grid, **rows)
        self.cache.finish_unit(self.split, index, record, curves)
        self.units += 1
