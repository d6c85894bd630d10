"""Evaluation images for the token-budget callback: this rank's share of the trainer's val dataloader.

Under DDP the trainer's val dataloader already yields only this rank's samples (a distributed
sampler, or webdataset's split by node), so each rank takes its first `n` and the ranks together
cover the first `n * world_size` images (`vlt.metrics.budget.data.take_images`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
from torch import Tensor

from vlt.metrics.budget.data import take_images


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
    """This rank's first `n` val images and labels (on CPU), re-cut into batches of `batch_size`."""
    return take_images(_val_loader(trainer), n, batch_size)
