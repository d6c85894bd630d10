"""ModelCheckpoint whose `last.ckpt` is the fit's final step.

Lightning 2.6's `ModelCheckpoint(save_last=True, every_n_train_steps=S)` saves "last" beside each
step-S file, and at the end of a fit only if it never saved one before. A run whose `max_steps` is not a
multiple of S therefore ended with `last.ckpt` at the last multiple of S: every tool that reads
`last.ckpt` (stage 2's tokenizer, `vlt sample`, resumes with `--ckpt_path=last`) silently got an older
model. This subclass writes it once more at the end of a fit when the final step is not saved yet.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments); with `save_last`, `last.ckpt` holds the final step."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's skip rule includes "this step is saved already".
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
