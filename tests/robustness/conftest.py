"""The robustness tier: real corrupted files, real signals to real processes, real tiny fits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.robustness)


def png(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sample_members(key: str, seed: int, label: int = 1, meta: dict | None = None) -> list[tuple[str, bytes]]:
    """The three members of one img2dataset-style sample: png, cls, json."""
    record = {"label": label, "complexity": 2, **(meta or {})}
    return [
        (f"{key}.png", png(seed)),
        (f"{key}.cls", str(label).encode()),
        (f"{key}.json", json.dumps(record).encode()),
    ]


def write_tar(path: Path, members: list[tuple[str | bytes, bytes]]) -> Path:
    """A ustar archive (what webdataset writes); names may be raw bytes (undecodable on purpose)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.decode("latin-1") if isinstance(name, bytes) else name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shard(path: Path, n: int, start: int = 0, **kw) -> Path:
    members = [m for i in range(start, start + n) for m in sample_members(f"s{i:05d}", i, **kw)]
    return write_tar(path, members)


def read_val(spec, **kw) -> tuple[list[str], object]:
    """Every key a validation loader yields, and the datamodule (for its counts)."""
    from vlt.data import WebDataModule

    dm = WebDataModule(val=spec, image_size=16, val_batch_size=4, num_workers=kw.pop("num_workers", 0), **kw)
    dm.setup()
    keys = [k for batch in dm.val_dataloader() for k in batch.key]
    return keys, dm
