"""WebDataModule: DDP-safe epochs, exactly-once validation, bad samples, shard specs, latents."""

from __future__ import annotations

import io
import logging

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlt.data import SkippedSamples, WebDataModule, builders


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic set: 24 train samples in 6 shards, 10 val samples in 4 shards (3, 3, 3, 1)."""
    out = tmp_path_factory.mktemp("synthetic")
    builders.synthetic(out=str(out), n_train=24, n_val=10, shard_size=3, progress=False)
    return out


def val_keys(spec, monkeypatch, ranks: int, workers: int) -> list[list[str]]:
    per_rank = []
    for rank in range(ranks):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(ranks))
        dm = WebDataModule(val=spec, num_workers=workers, val_batch_size=2)
        dm.setup()
        per_rank.append([k for batch in dm.val_dataloader() for k in batch.key])
    return per_rank


def test_train_batches_equal_on_every_rank(shards, monkeypatch):
    counts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = WebDataModule(
            train=str(shards / "train-*.tar"), num_workers=2, batch_size=4, batches_per_epoch=7
        )
        dm.setup()
        loader = dm.train_dataloader()
        for _epoch in range(2):
            batches = list(loader)
            assert all(b.image.shape == (4, 3, 32, 32) for b in batches)
            counts.append(len(batches))
        assert len(loader) == 7
    assert counts == [7, 7, 7, 7]


@pytest.mark.parametrize("val", ["val-*.tar", "val-00000[01].tar"])  # 4 shards, and fewer than readers
def test_validation_reads_every_sample_exactly_once(shards, monkeypatch, val):
    everything = val_keys(str(shards / "val-*.tar"), monkeypatch, ranks=1, workers=0)[0]
    per_rank = val_keys(str(shards / val), monkeypatch, ranks=2, workers=2)
    keys = [k for rank in per_rank for k in rank]
    expected = everything if val == "val-*.tar" else everything[:6]
    assert len(keys) == len(set(keys)) and set(keys) == set(expected)
    assert all(per_rank), "each rank gets some shards here"


def test_shard_spec_forms_read_the_same_samples(shards, monkeypatch):
    monkeypatch.setenv("VLT_ALLOW_PIPE", "1")  # `pipe:` runs a shell command: opt-in only
    paths = [str(shards / f"val-{i:06d}.tar") for i in range(4)]
    specs = [
        str(shards / "val-{000000..000003}.tar"),
        str(shards / "val-*.tar"),
        paths,
        [f"pipe:cat {p}" for p in paths],
    ]
    results = []
    for spec in specs:
        dm = WebDataModule(val=spec, num_workers=0)
        dm.setup()
        results.append([k for b in dm.val_dataloader() for k in b.key])
    assert len(results[0]) == 10 and all(r == results[0] for r in results)


def test_missing_and_empty_shard_sets_raise_clear_errors(tmp_path, shards):
    for spec in (str(tmp_path / "nothing-*.tar"), str(tmp_path / "x-{000000..000001}.tar"), "gone.tar"):
        with pytest.raises(ValueError, match="make data") as info:
            WebDataModule(train=spec).setup()
        assert spec.split("/")[-1].split("{")[0].split("*")[0] in str(info.value)
    with pytest.raises(ValueError, match="empty set"):
        WebDataModule(val=[]).setup()
    with pytest.raises(ValueError, match="'bogus'"):
        WebDataModule(train=str(shards / "train-*.tar"), crop="bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        WebDataModule(train=str(shards / "train-*.tar"), kind="bogus")


@pytest.fixture
def corrupt(tmp_path):
    """Two shards: 8 good samples, a truncated PNG, random bytes named .JPG, a sample with only .cls."""
    good = {f"good{i}": png(i) for i in range(8)}
    bad = {"truncated": {"png": png(99)[:200]}, "noise": {"JPG": bytes(range(256)) * 4}, "nolabel": {}}
    samples = [{"__key__": k, "png": v, "cls": b"1"} for k, v in good.items()]
    samples += [{"__key__": k, "cls": b"2", **v} for k, v in bad.items()]
    order = [samples[i] for i in (0, 8, 1, 2, 9, 3, 4, 5, 6, 10, 7)]
    for s, part in enumerate((order[:5], order[5:])):
        with wds.TarWriter(str(tmp_path / f"val-{s:06d}.tar")) as sink:
            for sample in part:
                sink.write(sample)
    return tmp_path, sorted(good)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_warned(corrupt, workers, caplog):
    folder, good = corrupt
    dm = WebDataModule(val=str(folder / "val-*.tar"), num_workers=workers, val_batch_size=3)
    dm.setup()
    keys = []
    with caplog.at_level(logging.WARNING, logger="vlt.data.datamodule"):
        for batch in dm.val_dataloader():
            batch = dm.on_after_batch_transfer(batch, 0)
            assert batch.skips is None and batch.label.eq(1).all()
            keys += batch.key
    assert sorted(keys) == good and dm.skipped == 3
    warned = caplog.text
    assert all(k in warned for k in ("truncated", "noise", "nolabel"))


def test_latent_shards(tmp_path):
    torch.manual_seed(0)
    latents = {f"s{i}": torch.randn(16, 4).numpy().astype(np.float16) for i in range(5)}
    with wds.TarWriter(str(tmp_path / "lat-000000.tar")) as sink:
        for i, (key, lat) in enumerate(latents.items()):
            buf = io.BytesIO()
            np.save(buf, lat)
            meta = {"complexity": i} | ({"k": 8} if i % 2 else {})
            sink.write({"__key__": key, "latent.npy": buf.getvalue(), "cls": str(i).encode(), "json": meta})
        sink.write({"__key__": "empty", "cls": b"0"})
    dm = WebDataModule(val=str(tmp_path / "lat-*.tar"), kind="latents", num_workers=0, val_batch_size=8)
    dm.setup()
    (batch,) = list(dm.val_dataloader())
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch.latent.dtype == torch.float32 and batch.latent.shape == (5, 16, 4)
    assert torch.equal(batch.latent[2], torch.from_numpy(latents["s2"].astype(np.float32)))
    assert batch.k.tolist() == [-1, 8, -1, 8, -1] and batch.label.tolist() == [0, 1, 2, 3, 4]
    assert batch.complexity.tolist() == [0, 1, 2, 3, 4] and dm.skipped == 1


class TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Conv2d(3, 3, 1)

    def _step(self, batch: dict) -> torch.Tensor:
        return (self.net(batch.image) - batch.image).pow(2).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._step(batch), batch_size=len(batch.key))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_logs_skipped_samples(corrupt, tmp_path):
    torch.manual_seed(0)
    folder, _ = corrupt
    spec = str(folder / "val-*.tar")
    dm = WebDataModule(train=spec, val=spec, num_workers=0, batch_size=4, batches_per_epoch=3)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyModel(), datamodule=dm)
    assert sum(isinstance(c, SkippedSamples) for c in trainer.callbacks) == 1
    assert dm.skipped >= 3  # the validation pass alone meets all three bad samples
    assert trainer.callback_metrics["data/skipped"].item() == dm.skipped
    assert dm.state_dict() == {"skipped": dm.skipped, "shard_errors": 0}
