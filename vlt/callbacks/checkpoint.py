"""ModelCheckpoint whose `last.ckpt` is the fit's final step.

Lightning 2.6's `ModelCheckpoint(save_last=True, every_n_train_steps=S)` saves "last" beside each
step-S file, and at the end of a fit only if it never saved one before. A run whose `max_steps` is not a
multiple of S therefore ended with `last.ckpt` at the last multiple of S: every tool that reads
`last.ckpt` (stage 2's tokenizer, `vlt sample`, resumes with `--ckpt_path=last`) silently got an older
model. This subclass also writes it at the step that reaches `max_steps`.

That save happens at the step's end, as the step-S saves do, and not in `on_train_end`: by then
`WeightAveraging` has copied its average over the training weights, and a resume from that file would
go on from the average. A fit that ends some other way (`max_epochs`, a stopping callback) still gets
its final `last.ckpt` at the end, with that caveat.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments); with `save_last`, `last.ckpt` holds the final step."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_final_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_final_last(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_final_last(self, trainer: L.Trainer) -> None:
        # Lightning's skip rule includes "this step is saved already".
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
