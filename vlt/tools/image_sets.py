"""Image sets of `vlt eval`: an ADM npz, an image folder or webdataset shards, read as uint8 batches.

Letters: N images, B batch, H/W height/width.

  * npz: `arr_0` uint8 (N, H, W, 3), the layout of ADM's sample and reference batches (and of
    `vlt sample`), optional `arr_1` labels. An ADM reference batch may also hold precomputed
    Inception statistics `mu`, `sigma`, `mu_s`, `sigma_s`, besides or instead of `arr_0`; a
    `features` entry names another extractor (`vlt eval --save-ref` writes it).
  * folder: every image file below it, in sorted path order (`vlt.data.folder.scan`).
  * shards: a shard file, glob or brace pattern (`data/synthetic/shards/val-*.tar`), in shard order.
Opening a set reads no image. Images keep their size (the extractor resizes); sizes differing within
a set are an error, and so is an unreadable image: skipping one would change the numbers silently.
"""

from __future__ import annotations

import glob
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from vlt.data.folder import scan
from vlt.data.shards import resolve_shards
from vlt.data.transforms import IMAGE_EXTENSIONS, decode_image

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURES_KEY = "features"  # extractor of the statistics; absent (ADM's batches): Inception
SetKind = Literal["npz", "folder", "shards"]


@dataclass
class ImageSet:
    """One input set: where it is, its kind, and for an npz its open archive and statistics."""

    path: str
    kind: SetKind
    archive: np.lib.npyio.NpzFile | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    stats_features: str = "inception"

    @property
    def has_images(self) -> bool:
        return self.kind != "npz" or "arr_0" in self.archive.files

    def size_hint(self) -> int | None:
        """The number of images where it is known without reading them all (progress display)."""
        if self.kind == "folder":
            return len(scan(self.path)[0])
        return None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """(B, H, W, 3) uint8 batches in the set's order."""
        if self.kind == "npz":
            return _npz_batches(self.path, batch_size)
        items = _folder_images(self.path) if self.kind == "folder" else _shard_images(self.path)
        return _batched(items, batch_size, self.path)


def open_set(path: str, what: str = "SAMPLES") -> ImageSet:
    """Recognise `path` as an npz, a folder or shards (reading no image); a clear error otherwise."""
    p = Path(path).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise ValueError(f"{what} {path} does not exist (an ADM-style .npz with arr_0 uint8 NHWC)")
        archive = np.load(p, allow_pickle=False)
        stats = {k: archive[k] for k in STAT_KEYS if k in archive.files}
        if "arr_0" not in archive.files and not stats:
            raise ValueError(f"{what} {path} holds neither images (arr_0) nor statistics {STAT_KEYS}")
        named = str(archive[FEATURES_KEY]) if FEATURES_KEY in archive.files else "inception"
        return ImageSet(str(p), "npz", archive, stats, named)
    if p.is_dir():
        if not scan(p)[0]:
            raise ValueError(f"{what} folder {path} holds no image files")
        return ImageSet(str(p), "folder")
    if p.is_file() or glob.has_magic(path) or "{" in path:
        resolve_shards(path)  # raises naming the pattern that matched nothing
        return ImageSet(path, "shards")
    raise ValueError(
        f"{what} {path} does not exist: give an .npz (arr_0 uint8 NHWC), an image folder, or webdataset "
        "shards (a .tar file or a pattern such as data/synthetic/shards/val-*.tar)"
    )


def _npz_batches(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """arr_0 of an npz streamed `batch_size` images at a time: 50k samples at 256^2 are 9.8 GB.

    Written here (numpy has no partial read of an npz member): the member's .npy header gives dtype
    and shape, then the C-order rows are read straight from the (possibly compressed) zip stream.
    """
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise ValueError(f"{path} holds statistics only, no images (arr_0)")
        with archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            readers = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }
            if version not in readers:
                raise ValueError(
                    f"{path}: arr_0 is in .npy format {version}; re-save it with numpy's np.savez"
                )
            shape, fortran, dtype = readers[version](f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise ValueError(
                    f"{path}: arr_0 is {dtype} {shape}; expected uint8 (N, H, W, 3) as ADM's evaluator reads "
                    "it (convert NCHW with .transpose(0, 2, 3, 1), floats in [-1, 1] with to_uint8)"
                )
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(
                        f"{path}: arr_0 ends after {start} of {shape[0]} images (truncated file)"
                    )
                yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def _folder_images(root: str) -> Iterator[tuple[str, np.ndarray]]:
    for entry in scan(root)[0]:
        try:
            yield str(entry.path), np.asarray(decode_image(entry.path.read_bytes()))
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on bad bytes
            raise ValueError(f"cannot read image {entry.path}: {type(exc).__name__}: {exc}") from exc


def _shard_images(pattern: str) -> Iterator[tuple[str, np.ndarray]]:
    from vlt.data.tario import tar_samples  # here: it imports webdataset (and torch)

    for sample in tar_samples({"url": url} for url in resolve_shards(pattern)):
        name = f"{sample.get('__url__', pattern)}:{sample.get('__key__', '?')}"
        data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if "__error__" in sample or data is None:
            raise ValueError(f"cannot read sample {name}: {sample.get('__error__', 'no image member')}")
        try:
            yield name, np.asarray(decode_image(data))
        except Exception as exc:
            raise ValueError(f"cannot decode sample {name}: {type(exc).__name__}: {exc}") from exc


def _batched(items: Iterator[tuple[str, np.ndarray]], batch_size: int, where: str) -> Iterator[np.ndarray]:
    """(name, (H, W, 3)) items -> (B, H, W, 3) batches; every image must have the first one's size."""
    first: tuple[str, tuple[int, ...]] | None = None
    batch: list[np.ndarray] = []
    for name, image in items:
        if first is None:
            first = (name, image.shape)
        elif image.shape != first[1]:
            raise ValueError(
                f"{where}: {name} is {image.shape[1]}x{image.shape[0]}, {first[0]} is "
                f"{first[1][1]}x{first[1][0]}; resize the set to one size first (ADM batches are one size)"
            )
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
