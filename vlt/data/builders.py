"""`vlt data synthetic|photos|folder|imagenet`: build webdataset shard sets (layout: vlt.data.shards).

Each command is a plain typed function: its signature and docstring ARE the command line
(`jsonargparse.CLI(COMMANDS, as_positional=False)`). Each shows a progress bar, prints one summary
line, and returns the info dict it wrote to `<out>/info.json`.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from multiprocessing import Pool
from multiprocessing.pool import Pool as PoolType
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlt import console
from vlt.data import folder as folder_lib
from vlt.data import imagenet as imagenet_lib
from vlt.data import photos as photo_lib
from vlt.data import synthetic as synthetic_lib
from vlt.data.shards import SplitWriter


def _bar(items, *, total: int, desc: str, show: bool):
    """`vlt.console.progress` (a bar on a terminal, status lines on a pipe) when `show`, else the items."""
    return console.progress(items, total=total, desc=desc) if show else items


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[PoolType | None]:
    """A process pool for workers > 1, else None (work in this process)."""
    if workers <= 1:
        yield None
        return
    with Pool(workers) as pool:
        yield pool


def _finish(name: str, writer: SplitWriter, info: dict[str, Any], skipped: int, t0: float) -> dict:
    n_shards = writer.close({**info, "skipped": skipped})
    c = writer.counts
    total = sum(c.values())
    print(
        f"{name}: {total} samples in {n_shards} shards (train {c.get('train', 0)}, val {c.get('val', 0)}), "
        f"{skipped} skipped, {time.perf_counter() - t0:.1f} s -> {writer.out}"
    )
    return {"counts": dict(c), "shards": n_shards, **info, "skipped": skipped}


def _synthetic_sample(job: tuple[int, str, int, int, int]) -> tuple[str, int, bytes, int, dict]:
    """One synthetic sample from its own seeded generator (a pool job: top level, picklable)."""
    seed, split, i, image_size, max_shapes = job
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    img = synthetic_lib.render(rng, image_size, max_shapes)
    meta = {"complexity": img.complexity, "source": "synthetic", "shapes": list(img.shapes)}
    return split, i, _png(img.pixels), img.label, meta


def synthetic(
    out: str = "data/synthetic/shards",
    n_train: int = 4000,
    n_val: int = 512,
    image_size: int = 32,
    max_shapes: int = 10,
    shard_size: int = 500,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Procedural mixed-complexity images: colour gradients with 0..max_shapes shapes.

    complexity = number of shapes (uniform); label = background hue bucket (10 classes), independent
    of complexity. Sample i of a split is drawn from its own generator seeded by (seed, split, i): the
    same seed gives the same bytes, and a larger n_train keeps the first samples unchanged.

    Args:
        out: output folder for <split>-NNNNNN.tar shards and info.json.
        n_train: number of training images.
        n_val: number of validation images.
        image_size: side of the square images in pixels.
        max_shapes: largest shape count (complexity range 0..max_shapes).
        shard_size: samples per shard.
        seed: base random seed.
        workers: processes that render and encode (1 = in this process); output is identical.
        progress: show a progress bar.
    """
    t0 = time.perf_counter()
    jobs = [(seed, "train", i, image_size, max_shapes) for i in range(n_train)]
    jobs += [(seed, "val", i, image_size, max_shapes) for i in range(n_val)]
    with SplitWriter(out, shard_size=shard_size) as writer, _pool(workers) as pool:
        samples = pool.imap(_synthetic_sample, jobs, chunksize=64) if pool else map(_synthetic_sample, jobs)
        for split, i, image, label, meta in _bar(samples, total=len(jobs), desc="synthetic", show=progress):
            writer.write(split, f"{split}_{i:06d}", image=image, ext="png", label=label, meta=meta)
        info = {
            "builder": "synthetic",
            "image_size": image_size,
            "classes": [f"hue{k}" for k in range(synthetic_lib.N_CLASSES)],
            "args": {"n_train": n_train, "n_val": n_val, "max_shapes": max_shapes, "seed": seed},
        }
        return _finish("synthetic", writer, info, 0, t0)


def _photo_sources(val_sources: list[str] | None) -> tuple[list[str], dict, dict]:
    """All known photo names, the loaded photos of each split (val: val_sources), the failed ones."""
    names = [*photo_lib.SKIMAGE_PHOTOS, *photo_lib.SKLEARN_PHOTOS]
    val_names = ["coffee", "flower"] if val_sources is None else list(val_sources)
    unknown = sorted(set(val_names) - set(names))
    if unknown:
        raise ValueError(f"val_sources {unknown} are not known photos; choose from {names}")
    loaded, failed = photo_lib.load_photos()
    print(
        "".join(f"photos: skipping source {name!r} ({reason})\n" for name, reason in failed.items()), end=""
    )
    by_split = {s: [p for p in loaded if (p.name in val_names) == (s == "val")] for s in ("train", "val")}
    return names, by_split, failed


def _write_crops(
    writer, by_split: dict, names: list[str], counts: dict, crop_args: dict, seed: int, progress: bool
):
    """Round-robin random crops of each split's source photos (label = index of the source)."""
    jobs = [(split, i) for split in ("train", "val") for i in range(counts[split] if by_split[split] else 0)]
    for split, i in _bar(jobs, total=len(jobs), desc="photos", show=progress):
        src = by_split[split][i % len(by_split[split])]
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        crop = photo_lib.random_crop(src.pixels, rng, **crop_args)
        meta = {"complexity": photo_lib.edge_complexity(crop), "source": src.name}
        writer.write(
            split, f"{split}_{i:06d}", image=_png(crop), ext="png", label=names.index(src.name), meta=meta
        )


def photos(
    out: str = "data/photos/shards",
    n_train: int = 3000,
    n_val: int = 512,
    image_size: int = 32,
    min_scale: float = 0.125,
    max_scale: float = 0.5,
    val_sources: list[str] | None = None,
    shard_size: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Random crops of the photographs shipped inside scikit-image and scikit-learn (no download).

    Crops take a log-uniform fraction min_scale..max_scale of the photo's short side, resized to
    image_size. The split is BY SOURCE PHOTO: val crops come only from val_sources, train crops from
    all others. label = index of the source in the fixed list of known photos (info.json "classes"),
    stable when a source fails to load; complexity = edge-density proxy 0..10
    (vlt.data.photos.edge_complexity). Sources that fail to load are skipped and counted.

    Args:
        out: output folder for <split>-NNNNNN.tar shards and info.json.
        n_train: number of training crops (round-robin over the train photos).
        n_val: number of validation crops (round-robin over the val photos).
        image_size: side of the square crops in pixels.
        min_scale: smallest crop side as a fraction of the photo's short side.
        max_scale: largest crop side as a fraction of the photo's short side.
        val_sources: photo names held out for validation (default: coffee, flower).
        shard_size: samples per shard.
        seed: base random seed.
        progress: show a progress bar.
    """
    t0 = time.perf_counter()
    names, by_split, failed = _photo_sources(val_sources)
    with SplitWriter(out, shard_size=shard_size) as writer:
        crop_args = {"size": image_size, "min_scale": min_scale, "max_scale": max_scale}
        counts = {"train": n_train, "val": n_val}
        _write_crops(writer, by_split, names, counts, crop_args, seed, progress)
        info = {
            "builder": "photos",
            "image_size": image_size,
            "classes": names,
            "sources": {s: [p.name for p in ps] for s, ps in by_split.items()},
            "failed_sources": failed,
            "args": {
                "n_train": n_train,
                "n_val": n_val,
                "min_scale": min_scale,
                "max_scale": max_scale,
                "seed": seed,
            },
        }
        return _finish("photos", writer, info, len(failed), t0)


def _write_files(
    writer: SplitWriter, encode, jobs: list[tuple], split_of: dict[Path, str], root, desc, workers, progress
) -> int:
    """Run the file jobs `(entry, ...)` through `encode` (in a pool when workers > 1) and write each
    result to the split `split_of[entry.path]`; returns how many files were skipped as undecodable
    (the first 5 printed with their errors).

    `encode` returns (entry, bytes or None, extension, error) and never raises
    (`vlt.data.folder.encode_file`, `vlt.data.imagenet.encode_adm`).
    """
    skipped, bad = 0, []
    with _pool(workers) as pool:
        results = pool.imap(encode, jobs, chunksize=16) if pool else map(encode, jobs)
        for entry, data, ext, error in _bar(results, total=len(jobs), desc=desc, show=progress):
            if data is None:
                skipped += 1
                bad.append(f"{entry.path}: {error}")
                continue
            meta = {"complexity": -1, "source": str(entry.path.relative_to(root))}
            writer.write(split_of[entry.path], entry.key, image=data, ext=ext, label=entry.label, meta=meta)
    for line in bad[:5]:
        print(f"{desc}: skipped {line}")
    return skipped


def folder(
    root: str,
    out: str,
    shard_size: int = 1000,
    workers: int = 2,
    resize: int | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Any image directory -> shards; undecodable files are skipped and counted, never fatal.

    `root/<class>/<img>` gives labels (sorted class names -> 0, 1, ...); images directly in root
    get label -1.

    Args:
        root: input directory (ImageFolder layout or flat).
        out: output folder for <split>-NNNNNN.tar shards and info.json.
        shard_size: samples per shard.
        workers: processes that decode/resize/encode (1 = in this process).
        resize: scale the short side to this many pixels and store PNG; None keeps the original bytes.
        val_fraction: fraction of files (seeded random choice) written to the val split.
        seed: seed of the train/val choice.
        progress: show a progress bar.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be within [0, 1]")
    t0 = time.perf_counter()
    entries, classes = folder_lib.scan(root)
    n_val = round(val_fraction * len(entries))
    val_idx = set(np.random.default_rng(seed).permutation(len(entries))[:n_val].tolist())
    split_of = {e.path: "val" if i in val_idx else "train" for i, e in enumerate(entries)}
    jobs = [(e, resize) for e in entries]
    with SplitWriter(out, shard_size=shard_size) as writer:
        encode = folder_lib.encode_file
        skipped = _write_files(writer, encode, jobs, split_of, root, "folder", workers, progress)
        info = {
            "builder": "folder",
            "image_size": resize,
            "classes": classes,
            "args": {"root": str(Path(root)), "resize": resize, "val_fraction": val_fraction, "seed": seed},
        }
        return _finish("folder", writer, info, skipped, t0)


def _imagenet_entries(
    root: str, val: bool, val_labels: str | None, val_synsets: str | None
) -> tuple[list, list, list[str]]:
    """(train entries, val entries, sorted synsets) of an ImageNet root; every val image labelled."""
    train_dir, val_dir = imagenet_lib.find_splits(root)
    train, synsets = imagenet_lib.train_entries(train_dir)
    if not val:
        return train, [], synsets
    if not val_dir.is_dir():
        raise ValueError(f"{val_dir} does not exist: unpack the val images there, or pass --val false")
    labels = imagenet_lib.read_val_labels(val_labels, val_synsets) if val_labels is not None else None
    return train, imagenet_lib.val_entries(val_dir, synsets, labels, str(val_labels)), synsets


def imagenet(
    root: str,
    out: str = "data/imagenet/shards",
    val_labels: str | None = None,
    val_synsets: str | None = None,
    resolution: int = 256,
    quality: int = imagenet_lib.JPEG_QUALITY,
    val: bool = True,
    shard_size: int = 1000,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """ImageNet (ILSVRC-2012) -> shards of ADM centre crops at `resolution`, stored as JPEG.

    Classes are the sorted WordNet ids of ROOT/train (the standard 0..999 index; info.json "classes").
    Train and val are ImageNet's own folders: no val split is cut out of train. Each image is cropped
    ONCE, here, with the ADM protocol (`vlt.data.transforms.adm_center_crop`: BOX halvings, BICUBIC
    short side, centre square) and re-encoded as JPEG (quality 95, 4:4:4 chroma; no PNG). The shards
    hold (resolution, resolution) images, so WebDataModule, `vlt cache-latents` and the real-image
    FID reader at image_size=resolution read exactly the protocol's pixels (their own resize and crop
    are no-ops) and the stage configs need no special transform; the price is one shard set per
    resolution and one JPEG generation on top of ImageNet's own. Undecodable files are skipped and
    counted. Layouts and labels files: `vlt.data.imagenet`.

    Args:
        root: ImageNet folder holding train/ and val/ (or the Kaggle download's Data/CLS-LOC/).
        out: output folder for <split>-NNNNNN.tar shards and info.json.
        val_labels: labels of a flat val folder: Kaggle's LOC_val_solution.csv, the devkit's
            ILSVRC2012_validation_ground_truth.txt (needs val_synsets) or '<file> <wnid>' lines.
            Not needed when val/ is sorted into <wnid>/ folders.
        val_synsets: ILSVRC2012_ID -> wnid for the devkit's ground truth: data/meta.mat of the
            devkit, or '<ILSVRC2012_ID> <wnid>' lines.
        resolution: side of the stored square crops (256, 512, ...).
        quality: JPEG quality of the stored crops.
        val: also build the val split (false: train only).
        shard_size: samples per shard.
        workers: processes that decode/crop/encode (1 = in this process).
        progress: show a progress bar.
    """
    if resolution < 1 or not 1 <= quality <= 100:
        raise ValueError(f"resolution={resolution} must be >= 1 and quality={quality} within 1..100")
    t0 = time.perf_counter()
    train, val_set, synsets = _imagenet_entries(root, val, val_labels, val_synsets)
    split_of = {e.path: "train" for e in train} | {e.path: "val" for e in val_set}
    jobs = [(e, resolution, quality) for e in [*train, *val_set]]
    with SplitWriter(out, shard_size=shard_size) as writer:
        encode = imagenet_lib.encode_adm
        skipped = _write_files(writer, encode, jobs, split_of, root, "imagenet", workers, progress)
        info = {
            "builder": "imagenet",
            "image_size": resolution,
            "classes": synsets,
            "transform": "adm_center_crop",
            "encoding": {"format": "jpeg", "quality": quality, "subsampling": "4:4:4"},
            "args": {"root": str(Path(root)), "val_labels": val_labels, "val_synsets": val_synsets},
        }
        return _finish("imagenet", writer, info, skipped, t0)


def embedded_shards(root: str = "data", *, build: bool = True, progress: bool = False) -> dict[str, Path]:
    """Folders of the embedded sets {"synthetic": root/synthetic/shards, "photos": ...}.

    A set whose info.json is missing is built with the defaults of `make data` when `build` is true
    (same defaults, same bytes), else a ValueError says to run `make data`.
    """
    builders = {"synthetic": synthetic, "photos": photos}
    folders = {}
    for name, build_set in builders.items():
        out = Path(root) / name / "shards"
        if not (out / "info.json").is_file():
            if not build:
                raise ValueError(f"{out} has no shards; run `make data`")
            build_set(out=str(out), progress=progress)
        folders[name] = out
    return folders


COMMANDS = [synthetic, photos, folder, imagenet]
