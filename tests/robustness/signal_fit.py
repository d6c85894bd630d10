"""A tiny real fit run as a subprocess by test_signals.py: `python signal_fit.py RUN_DIR steps|stall`.

"steps": a slow regression that prints "step N" after each optimizer step. "stall": a data stream
whose `pipe:` command never produces a byte. The fit goes through `vlt.runs.prepare_fit`, as `vlt fit`.
"""

from __future__ import annotations

import sys
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vlt import runs
from vlt.data import WebDataModule
from vlt.requeue import StopAtStepEnd


class Slow(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(0.05)
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, *args) -> None:
        print(f"step {self.global_step}", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(run_dir: str, mode: str) -> None:
    trainer = L.Trainer(
        max_steps=10_000, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=run_dir, callbacks=[StopAtStepEnd(grace_s=2.0)],
    )  # fmt: skip
    path = runs.prepare_fit(trainer, ckpt_path=None)
    if mode == "stall":
        data = WebDataModule(train="pipe:sleep 8", allow_pipe=True, num_workers=0, image_size=8)
        print("stalling", flush=True)
        trainer.fit(Slow(), datamodule=data, ckpt_path=path)
        return
    xy = TensorDataset(torch.randn(100_000, 4), torch.randn(100_000, 1))
    trainer.fit(Slow(), DataLoader(xy, batch_size=8), ckpt_path=path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
