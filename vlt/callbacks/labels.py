"""LabelCheck: every batch's labels must fit the model's classes, checked before the step uses them."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from vlt.data.labels import check_labels, model_classes
from vlt.types import ImageBatch, LatentBatch


class LabelCheck(Callback):
    """Raise a clear error (keys, labels, the config key) on a label the model has no class for.

    Without it a label >= num_classes fails as an index error inside the label embedding and a
    negative one silently trains the unconditional branch. One comparison of a (B,) tensor per batch.
    """

    def _check(self, pl_module: L.LightningModule, batch: Any, stage: str) -> None:
        if isinstance(batch, (ImageBatch, LatentBatch)):
            where = f"{stage} batch of {type(pl_module).__name__}"
            check_labels(batch.label, model_classes(pl_module), where=where, keys=batch.key)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *a: Any
    ) -> None:
        self._check(pl_module, batch, "training")

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *a: Any
    ) -> None:
        self._check(pl_module, batch, "validation")
