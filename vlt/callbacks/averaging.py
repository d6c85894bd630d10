"""The weights a run is judged by: a weight-averaging callback's (EMA) average, swapped in on demand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging


@contextlib.contextmanager
def averaged_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Inside the block `pl_module` holds the average of every active `WeightAveraging` callback
    (e.g. `EMAWeightAveraging`), as in Lightning's validation loop; outside it, the training weights.

    Lightning swaps the average in for its own validation epochs only, so an evaluation started from a
    training hook (a mid-fit budget curve) would otherwise measure the raw weights while the val
    metrics and the fit-end curve measure the average. `_swap_models` (an exchange of parameter and
    buffer values) is Lightning's own, private in the pinned 2.6 line; a swap is its own inverse.

    An average that has not been updated yet (before the first optimizer step: a "before" curve at
    on_train_start) is not swapped in. It is then the copy the callback took in its `setup`, which is
    stale for a module that gets its weights later (LitJoint reads its stage checkpoints in its own
    `setup`, after the callbacks'); its first update replaces it with the training weights anyway.
    """
    active = [
        cb
        for cb in trainer.callbacks
        if isinstance(cb, WeightAveraging)
        and cb._average_model is not None
        and int(cb._average_model.n_averaged) > 0
    ]
    for cb in active:
        cb._swap_models(pl_module)
    try:
        yield
    finally:
        for cb in reversed(active):
            cb._swap_models(pl_module)
