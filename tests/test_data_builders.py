"""Builders: what each writes is what WebDataModule reads; splits, reproducibility, the CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlt.data import WebDataModule, builders, synthetic
from vlt.data.transforms import to_unit_range


def read_all(spec: str | list[str], **kw) -> dict:
    """Every validation sample of `spec`, in order, as one dict of concatenated fields."""
    dm = WebDataModule(val=spec, num_workers=0, val_batch_size=7, **kw)
    dm.setup()
    out: dict = {"image": [], "label": [], "complexity": [], "key": []}
    for batch in dm.val_dataloader():
        dm.on_after_batch_transfer(batch, 0)
        for name in out:
            out[name].append(getattr(batch, name)) if name != "key" else out[name].extend(batch.key)
    out.update({k: torch.cat(v) for k, v in out.items() if k != "key"})
    out["skipped"] = dm.skipped
    return out


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_synthetic_round_trip(tmp_path):
    info = builders.synthetic(out=str(tmp_path), n_train=12, n_val=9, shard_size=4, seed=3, progress=False)
    assert info["counts"] == {"train": 12, "val": 9} and info["shards"] == 3 + 3
    got = read_all(str(tmp_path / "val-*.tar"))
    assert got["key"] == [f"val_{i:06d}" for i in range(9)]
    for i in range(9):
        img = synthetic.render(np.random.default_rng([3, 1, i]), 32, 10)
        assert torch.equal(got["image"][i], to_unit_range(img.pixels[None])[0])
        assert got["label"][i] == img.label and got["complexity"][i] == img.complexity
    assert got["image"].min() >= -1 and got["image"].max() <= 1 and got["skipped"] == 0


def test_synthetic_is_reproducible_and_seeded(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    builders.synthetic(out=str(a), n_train=6, n_val=2, seed=1, progress=False)
    builders.synthetic(out=str(b), n_train=6, n_val=2, seed=1, workers=1, progress=False)
    builders.synthetic(out=str(c), n_train=6, n_val=2, seed=2, progress=False)
    assert (a / "train-000000.tar").read_bytes() == (b / "train-000000.tar").read_bytes()
    assert (a / "train-000000.tar").read_bytes() != (c / "train-000000.tar").read_bytes()


def test_synthetic_complexity_covers_range(tmp_path):
    builders.synthetic(out=str(tmp_path), n_train=0, n_val=120, progress=False)
    got = read_all(str(tmp_path / "val-*.tar"))
    assert set(got["complexity"].tolist()) == set(range(11))
    assert got["label"].min() >= 0 and got["label"].max() < synthetic.N_CLASSES


def test_photos_split_by_source_and_round_trip(tmp_path):
    info = builders.photos(out=str(tmp_path), n_train=20, n_val=6, shard_size=8, progress=False)
    assert set(info["sources"]["val"]) == {"coffee", "flower"}
    assert not set(info["sources"]["train"]) & set(info["sources"]["val"])
    sources = {}
    for tar in sorted(tmp_path.glob("*.tar")):
        for name, data in tar_members(tar).items():
            if name.endswith(".json"):
                sources.setdefault(tar.name.split("-")[0], set()).add(json.loads(data)["source"])
    assert not sources["train"] & sources["val"] and sources["val"] <= {"coffee", "flower"}
    got = read_all([str(p) for p in sorted(tmp_path.glob("val-*.tar"))])
    members = tar_members(tmp_path / "val-000000.tar")
    first = np.asarray(Image.open(io.BytesIO(members["val_000000.png"])))
    assert torch.equal(got["image"][0], to_unit_range(first[None])[0])
    classes = info["classes"]
    assert {classes[i] for i in got["label"].tolist()} <= {"coffee", "flower"}
    assert got["complexity"].min() >= 0 and got["complexity"].max() <= 10


def test_folder_labels_resize_and_bad_files(tmp_path, capsys):
    torch.manual_seed(0)
    root = tmp_path / "in"
    pixels = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / cls / f"img.{i}.PNG")
            pixels[f"{cls}/img_{i}"] = arr
    (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(root / "flat.jpg")
    out = tmp_path / "out"
    info = builders.folder(
        root=str(root), out=str(out), shard_size=2, workers=2, val_fraction=0.0, progress=False
    )
    assert info["classes"] == ["cat", "dog"] and info["skipped"] == 1
    assert "1 skipped" in capsys.readouterr().out
    got = read_all(str(out / "train-*.tar"))
    labels = dict(zip(got["key"], got["label"].tolist()))
    assert labels == {**{k: 0 if k.startswith("cat") else 1 for k in pixels}, "flat": -1}
    for i, key in enumerate(got["key"]):
        if key in pixels:
            assert torch.equal(got["image"][i], to_unit_range(pixels[key][None])[0])
    resized = tmp_path / "resized"
    builders.folder(root=str(root), out=str(resized), resize=16, workers=1, val_fraction=0.5, progress=False)
    small = read_all(str(resized / "*.tar"), image_size=16)
    assert small["image"].shape[1:] == (3, 16, 16) and len(small["key"]) == 7


def test_cli_help_and_tiny_build(tmp_path, capsys):
    from vlt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synthetic", "--help"])
    assert exit_info.value.code == 0
    assert "--n_train" in capsys.readouterr().out
    main(
        ["data", "synthetic", "--out", str(tmp_path), "--n_train", "5", "--n_val", "3", "--progress", "false"]
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("synthetic: 8 samples in 2 shards (train 5, val 3), 0 skipped")
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["counts"] == {"train": 5, "val": 3} and info["image_size"] == 32
