"""WebDataModule under real DDP (2 CPU processes, gloo): equal train batches, exactly-once validation."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from vlt.data import WebDataModule, builders


class KeyRecorder(L.LightningModule):
    """Writes the train batch count and the validation keys each rank saw to <out>/rank<r>.json."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.net = torch.nn.Conv2d(3, 3, 1)
        self.train_batches, self.val_keys = 0, []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_batches += 1
        return (self.net(batch.image) - batch.image).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_keys += batch.key

    def on_fit_end(self) -> None:
        record = {"train_batches": self.train_batches, "val_keys": self.val_keys}
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
def test_ddp_equal_train_batches_and_exactly_once_validation(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    shards = tmp_path / "shards"
    builders.synthetic(out=str(shards), n_train=30, n_val=11, shard_size=3, progress=False)
    dm = WebDataModule(
        train=str(shards / "train-*.tar"),
        val=str(shards / "val-*.tar"),
        batch_size=4,
        batches_per_epoch=5,
        num_workers=1,
        val_batch_size=2,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["train_batches"] for r in ranks] == [5, 5]
    keys = [k for r in ranks for k in r["val_keys"]]
    assert sorted(keys) == [f"val_{i:06d}" for i in range(11)]
