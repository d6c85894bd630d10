"""Per-sample parsing: every bad value is skipped and counted with its reason; labels fit the model."""

from __future__ import annotations

import io
import json
import logging

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from tests.robustness.conftest import png, read_val, sample_members, write_tar
from vlt.callbacks.labels import LabelCheck
from vlt.data import WebDataModule
from vlt.data.labels import check_labels
from vlt.models.dit import DiT, DiTConfig

BAD_IMAGE_SAMPLES = {
    "overflow": [("overflow.png", png(1)), ("overflow.cls", b"99999999999999999999")],
    "nanlabel": [("nanlabel.png", png(2)), ("nanlabel.json", b'{"label": NaN}')],
    "badcomplexity": [("badcomplexity.png", png(3)), ("badcomplexity.json", b'{"complexity": "many"}')],
    "negative": [("negative.png", png(4)), ("negative.cls", b"-5")],
    "badjson": [("badjson.png", png(5)), ("badjson.json", b"{not json")],
    "textcls": [("textcls.png", png(6)), ("textcls.cls", b"cat")],
}


def test_bad_metadata_is_skipped_and_counted(tmp_path, caplog):
    members = [*sample_members("good0", 0)]
    for parts in BAD_IMAGE_SAMPLES.values():
        members += parts + sample_members(f"good{len(members)}", len(members))
    members += [("unlabelled.png", png(9)), ("unlabelled.txt", b"a caption, not a label")]
    with caplog.at_level(logging.WARNING):
        keys, dm = read_val(str(write_tar(tmp_path / "meta.tar", members)))
    assert dm.skipped == len(BAD_IMAGE_SAMPLES) and len(keys) == len(BAD_IMAGE_SAMPLES) + 2
    assert "unlabelled" in keys and all(k not in keys for k in BAD_IMAGE_SAMPLES)
    for reason in ("out of range", "nan is not", "'many'", "-5", "valid JSON", "'cat'"):
        assert reason in caplog.text


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_bad_latents_are_skipped(tmp_path):
    good = np.zeros((8, 4), np.float32)
    samples = {
        "a": good,
        "nan": np.full((8, 4), np.nan, np.float32),
        "shape": np.zeros((4, 8), np.float32),
        "b": good,
    }
    with wds.TarWriter(str(tmp_path / "lat-0.tar")) as sink:
        for key, latent in samples.items():
            sink.write({"__key__": key, "latent.npy": npy(latent), "json": json.dumps({"k": 4}).encode()})
    dm = WebDataModule(val=str(tmp_path / "lat-0.tar"), kind="latents", num_workers=0)
    dm.setup()
    keys = [k for batch in dm.val_dataloader() for k in batch.key]
    assert keys == ["a", "b"] and dm.skipped == 2


def test_check_labels_names_the_culprits_and_the_fix():
    check_labels(torch.tensor([-1, 0, 9]), 10, where="x")
    with pytest.raises(ValueError, match=r"cache: .*k2=12.*num_classes to at least 13"):
        check_labels(torch.tensor([0, 3, 12]), 10, where="cache", keys=["k0", "k1", "k2"])


class Labelled(L.LightningModule):
    """A real DiT with 3 classes whose step embeds the batch's labels."""

    def __init__(self) -> None:
        super().__init__()
        self.dit = DiT(DiTConfig(width=32, depth=1, heads=2, n_slots=4, channels=4, num_classes=3))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.dit.y_embed.embedding_table(batch.label).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_labels_outside_the_models_classes_stop_the_fit_at_the_first_batch(tmp_path):
    members = [m for i in range(8) for m in sample_members(f"s{i}", i, label=i % 5)]  # labels 3, 4 too big
    spec = str(write_tar(tmp_path / "train-0.tar", members))
    dm = WebDataModule(train=spec, image_size=16, batch_size=8, num_workers=0, shuffle_buffer=0)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LabelCheck()], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"training batch of Labelled: labels outside \[0, 3\).*=3"):
        trainer.fit(Labelled(), datamodule=dm)
