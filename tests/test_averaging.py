"""Evaluations started from training hooks and the pictures measure the EMA weights, as validation does."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.demos.boring_classes import BoringModel

from vlt.callbacks.averaging import averaged_weights


class Probe(L.Callback):
    """Records the first parameter as validation sees it and as `averaged_weights` gives it."""

    def __init__(self) -> None:
        self.validated, self.averaged, self.after = [], [], []

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self.validated.append(next(pl_module.parameters()).detach().clone())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        before = next(pl_module.parameters()).detach().clone()
        with averaged_weights(trainer, pl_module):
            self.averaged.append(next(pl_module.parameters()).detach().clone())
        self.after.append((before, next(pl_module.parameters()).detach().clone()))


@pytest.mark.parametrize("probe_first", [False, True])
def test_averaged_weights_are_the_validated_weights_in_either_callback_order(probe_first):
    torch.manual_seed(0)
    probe = Probe()
    callbacks = [EMAWeightAveraging(decay=0.5), probe]
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        callbacks=callbacks[::-1] if probe_first else callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert len(probe.averaged) == 2
    for validated, averaged, (before, after) in zip(probe.validated, probe.averaged, probe.after):
        assert torch.equal(averaged, validated)  # the weights validation measured at this step
        assert not torch.equal(before, validated)  # ... which are not the training weights
        assert torch.equal(before, after)  # and the training weights come back


def test_without_averaging_the_block_changes_nothing():
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    model = BoringModel()
    before = [p.detach().clone() for p in model.parameters()]
    with averaged_weights(trainer, model):
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class LoadsInSetup(BoringModel):
    """Gets its weights in its own `setup`, after the callbacks' (as LitJoint reads its stage checkpoints)."""

    def setup(self, stage: str) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(0.25)


class BeforeCurve(L.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        with averaged_weights(trainer, pl_module):
            self.seen.append(next(pl_module.parameters()).detach().clone())


def test_a_before_curve_measures_the_loaded_weights_not_the_averages_setup_copy():
    probe = BeforeCurve()
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=0, logger=False, callbacks=[EMAWeightAveraging(decay=0.5), probe],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LoadsInSetup())
    assert torch.all(probe.seen[0] == 0.25)  # before the first step: the weights setup loaded
