"""`vlt sample` on Lightning's predict loop: any number of devices and nodes, resumable by batch.

Letters: B images of a batch, N slots, C channels, K tokens.

    SampleBatches   this rank's share of the global batches (of every K) that have no part file yet
    SampleData      the predict loader of the rank the Trainer runs as (DDP, torchrun or srun)
    LitSampler      the LatentGenerator in a LightningModule: predict_step = one batch of images
    PartWriter      Lightning's prediction writer: each finished batch becomes one part file

Image i of K starts from noise seeded by (seed, i, K) only (`vlt.objectives.flow.indexed_noise`) and
batch b always holds the indices [b B, (b + 1) B): the images do not depend on the number of processes,
and a part made by one run is the part any other run would make (`vlt.data.sample_parts`).
"""

from __future__ import annotations

import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from vlt.data.sample_parts import SampleParts, batch_indices, batches
from vlt.data.transforms import to_uint8
from vlt.objectives.flow import indexed_noise
from vlt.stages import LatentGenerator


class SampleBatches(Dataset):
    """Whole batches as items: {"k": K, "batch": b, "index": (B,) global indices}.

    The (K, batch) pairs are dealt round-robin over the ranks; each rank drops those whose part exists,
    so a restarted job makes only what is missing (only this rank writes its pairs: no race), plus at
    most one batch per rank that had nothing left.
    """

    def __init__(self, parts: SampleParts, ks: list[int], count: int, batch_size: int, rank: int, world: int):
        pairs = [(k, b) for k in ks for b in range(batches(count, batch_size))]
        mine = pairs[rank::world] or [pairs[rank % len(pairs)]]  # more ranks than batches: share one
        # Lightning refuses a rank whose predict loader is empty while others have batches: a rank with
        # nothing left redoes one of its batches (the same bytes, renamed over the old part).
        self.items = [(k, b) for k, b in mine if not parts.done(k, b)] or mine[:1]
        self.count, self.batch_size = count, batch_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        k, b = self.items[i]
        span = batch_indices(b, self.count, self.batch_size)
        return {"k": k, "batch": b, "index": torch.arange(span.start, span.stop)}


class SampleData(pl.LightningDataModule):
    """The predict loader of this rank; built when the Trainer knows its global rank and world size."""

    def __init__(self, parts: SampleParts, ks: list[int], count: int, batch_size: int) -> None:
        super().__init__()
        self.parts, self.ks, self.count, self.batch_size = parts, ks, count, batch_size

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        data = SampleBatches(self.parts, self.ks, self.count, self.batch_size, rank, world)
        # Items are whole batches of indices: nothing to load, so no workers (Lightning's hint is moot), and
        # no batch sampler whose indices Lightning could pass to the writer (parts carry their own index).
        warnings.filterwarnings("ignore", message=".*predict_dataloader' does not have many workers")
        warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices fetched")
        return DataLoader(data, batch_size=None, shuffle=False)


class LitSampler(pl.LightningModule):
    """Class-conditional sampling with a LatentGenerator; label of image i: `labels[i % len(labels)]`.

    Args:
        generator: the stage-2 generator (decodes with its tokenizer).
        labels: the cycle of class labels (all classes: every class gets count / #classes images).
        seed: with the image index and K, the one source of each image's noise.
        steps, cfg_scale: sampler settings (None: the generator's `flow` settings).
        schedule: coarse-to-fine K schedule (`vlt.objectives.schedule.KSchedule` text); the images of K
            follow it capped at K, and each split's fresh noise is indexed like the starting noise.
    """

    def __init__(
        self,
        generator: LatentGenerator,
        *,
        labels: list[int],
        seed: int,
        steps: int | None = None,
        cfg_scale: float | None = None,
        schedule: str | None = None,
    ) -> None:
        super().__init__()
        self.generator = generator.eval()
        self.register_buffer("cycle", torch.tensor(labels, dtype=torch.long), persistent=False)
        self.seed, self.steps, self.cfg_scale = seed, steps, cfg_scale
        self.schedule = generator.schedule(schedule) if schedule else None

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        k, index = int(batch["k"]), batch["index"]  # index: (B,)
        y = self.cycle[index.to(self.cycle.device) % len(self.cycle)]  # (B,)
        dit = self.generator.dit.cfg
        noise = indexed_noise(self.seed, index.tolist(), k, dit.n_slots, dit.channels)  # (B, N, C)
        plan = self.schedule.capped(k) if self.schedule is not None else k
        splits = [
            indexed_noise(self.seed, index.tolist(), f"{k}-split{j}", dit.n_slots, dit.channels).to(
                self.device
            )
            for j in range(self.generator.split_count(plan, self.steps))
        ]  # (B, N, C) each
        images = self.generator.generate(
            y,
            plan,
            noise=noise.to(self.device),
            split_noise=splits,
            steps=self.steps,
            cfg_scale=self.cfg_scale,
        )  # (B, 3, H, W)
        return {
            "k": k,
            "batch": int(batch["batch"]),
            "images": to_uint8(images),  # (B, H, W, 3)
            "labels": y.cpu().numpy(),
            "index": index.cpu().numpy().astype(np.int64),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Slurm's requeue signal makes Lightning save an hpc checkpoint even in predict: keep it small.
        Nothing in it is read back (the weights are in --dit; a requeued job resumes from its parts)."""
        checkpoint["state_dict"] = {}


class PartWriter(BasePredictionWriter):
    """Writes each predicted batch as its part file (the caller waits for every rank before reading them:
    a rank with no batch left skips the whole loop, and its hooks, in Lightning)."""

    def __init__(self, parts: SampleParts) -> None:
        super().__init__(write_interval="batch")
        self.parts = parts
        self.written = self.images = 0
        self.started = self.finished = 0.0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.finished = time.perf_counter()  # after start-up: the rate is sampling's own

    @property
    def images_per_second(self) -> float:
        return self.images / (self.finished - self.started) if self.finished > self.started else 0.0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dl_idx):
        p = prediction
        self.parts.write(p["k"], p["batch"], p["images"], p["labels"], p["index"])
        self.written += 1
        self.images += len(p["index"])
        self.finished = time.perf_counter()
