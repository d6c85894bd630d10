"""The part files of a large `vlt sample` run: one npz per global batch, written atomically, resumable.

Letters: B images of a batch, H, W image size.

    <out>/parts/run.json             the settings the parts were made with (a restart must match them)
    <out>/parts/k<K>-b<batch>.npz    images (B, H, W, 3) uint8, labels (B,), index (B,) global indices

Batch b of K holds the global indices [b * batch_size, min((b + 1) * batch_size, count)), whichever rank
made it: a part's content depends on neither the rank nor the world size, so a job restarted on another
number of processes skips every finished part. No torch, no Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlt.paths import replace_with


def batches(count: int, batch_size: int) -> int:
    """Global batches of `count` images, the last one possibly short."""
    return -(-count // batch_size)


def batch_indices(batch: int, count: int, batch_size: int) -> range:
    """Global image indices of one batch."""
    return range(batch * batch_size, min((batch + 1) * batch_size, count))


class SampleParts:
    """The parts folder of one sampling run.

    Args:
        root: the run's output folder; parts go to root/parts.
        settings: everything that decides the images (source, K, count, batch size, seed, steps, ...).
    """

    def __init__(self, root: str | Path, settings: dict) -> None:
        self.dir = Path(root) / "parts"
        self.settings = settings

    def name(self, k: int, batch: int) -> Path:
        return self.dir / f"k{k}-b{batch:06d}.npz"

    def done(self, k: int, batch: int) -> bool:
        return self.name(k, batch).is_file()

    def check_settings(self) -> None:
        """Record the settings, or refuse to mix parts made with other settings into this run."""
        self.dir.mkdir(parents=True, exist_ok=True)
        record = self.dir / "run.json"
        if record.is_file():
            old = json.loads(record.read_text())
            if old != self.settings:
                changed = sorted(
                    key for key in {*old, *self.settings} if old.get(key) != self.settings.get(key)
                )
                raise ValueError(
                    f"{self.dir} holds parts of a run with other settings ({', '.join(changed)} differ): "
                    f"resume with the same options, or pass another --out (or delete {self.dir})"
                )
            return
        # Every rank writes the same content; the rename makes each write whole.
        replace_with(record, lambda f: f.write(json.dumps(self.settings, indent=2).encode()))

    def write(self, k: int, batch: int, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Path:
        """One finished batch, written to a temporary file and renamed: a killed job leaves no half part."""
        path = self.name(k, batch)
        replace_with(path, lambda f: np.savez(f, images=images, labels=labels, index=index))
        return path

    def collect(self, k: int, count: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """All parts of K in global-index order: images (count, H, W, 3) uint8 and labels (count,)."""
        n = batches(count, batch_size)
        missing = [self.name(k, b).name for b in range(n) if not self.done(k, b)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {n} parts of K={k} are missing in {self.dir} (first: {missing[0]}); "
                "run the same command again to make them"
            )
        images: np.ndarray | None = None
        labels = np.empty(count, dtype=np.int64)
        for b in range(n):
            span = batch_indices(b, count, batch_size)
            with np.load(self.name(k, b)) as part:
                if not np.array_equal(part["index"], np.arange(span.start, span.stop)):
                    raise ValueError(
                        f"{self.name(k, b)} holds other indices than batch {b}: delete it and rerun"
                    )
                if images is None:
                    images = np.empty((count, *part["images"].shape[1:]), dtype=np.uint8)
                images[span.start : span.stop] = part["images"]
                labels[span.start : span.stop] = part["labels"]
        assert images is not None
        return images, labels


def save_adm_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The ADM layout external FID evaluators read: arr_0 uint8 (N, H, W, 3), arr_1 labels (N,)."""
    replace_with(path, lambda f: np.savez(f, images, labels))
    return path
