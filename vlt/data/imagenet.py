"""ImageNet (ILSVRC-2012) for `vlt data imagenet`: the folder layout, the classes, the val labels, one job.

Train: `ROOT/train/<wnid>/*.JPEG` (the devkit's tars unpacked) or `ROOT/Data/CLS-LOC/train` (the Kaggle
download). Classes are the WordNet ids (`n01440764`, ...) in sorted order: the standard 0..999 index.
Val: `ROOT/val/*.JPEG` (flat) with a labels file, or `ROOT/val/<wnid>/*.JPEG` (already sorted into
synset folders). Labels files (`--val-labels`):

- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`; the first word of PredictionString is
  the synset;
- the devkit's `ILSVRC2012_validation_ground_truth.txt`: one ILSVRC2012_ID (1..1000) per line, line i
  for `ILSVRC2012_val_<i:08d>`. These ids are NOT the sorted-synset index: they map to synsets
  through `--val-synsets`, the devkit's `data/meta.mat` or a text file of `<ILSVRC2012_ID> <wnid>`
  lines;
- a text file of `<file name> <wnid>` lines (file name with or without extension).

Every val image needs a label and every label a training synset: otherwise a ValueError names the file
and what to pass. The encode job is a top-level function (it runs in a multiprocessing pool) that
returns bytes or an error string, never raises, like `vlt.data.folder.encode_file`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path

from vlt.data import folder
from vlt.data.folder import Entry
from vlt.data.transforms import adm_center_crop, decode_image

WNID = re.compile(r"^n\d{8}$")
JPEG_QUALITY = 95
VAL_NAME = "ILSVRC2012_val_{:08d}"  # the devkit's val file names, numbered from 1
LABELS_HELP = (
    "pass --val_labels with Kaggle's LOC_val_solution.csv, the devkit's "
    "ILSVRC2012_validation_ground_truth.txt (with --val_synsets data/meta.mat) or a '<file> <wnid>' list"
)


def find_splits(root: str | Path) -> tuple[Path, Path]:
    """(train folder, val folder) of an ImageNet root: ROOT/{train,val} or ROOT/Data/CLS-LOC/{train,val}."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"--root {str(root)!r} does not exist or is not a directory; point it at the folder that holds "
            "train/ and val/ (or Data/CLS-LOC/ of the Kaggle download)"
        )
    for base in (root, root / "Data" / "CLS-LOC"):
        if (base / "train").is_dir():
            return base / "train", base / "val"
    raise ValueError(
        f"--root {str(root)!r} has neither train/ nor Data/CLS-LOC/train/: expected train/<wnid>/*.JPEG"
    )


def train_entries(train_dir: Path) -> tuple[list[Entry], list[str]]:
    """Training files and the sorted synsets (class i = synsets[i]); loose files or odd folders raise."""
    entries, synsets = folder.scan(train_dir)
    loose = [e.path for e in entries if e.label == -1]  # scan: -1 = a file directly in the folder
    if loose:
        raise ValueError(f"{loose[0]} lies directly in {train_dir}: train images belong in <wnid>/ folders")
    odd = [name for name in synsets if not WNID.match(name)]
    if odd:
        raise ValueError(f"{train_dir}: folders {odd[:5]} are not WordNet ids (n + 8 digits, e.g. n01440764)")
    if not entries:
        raise ValueError(f"{train_dir} holds no images: expected {train_dir}/<wnid>/*.JPEG")
    return entries, synsets


def _kaggle_csv(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise ValueError(f"{path}: a labels .csv needs the columns ImageId,PredictionString (Kaggle's file)")
    return {row["ImageId"]: (row["PredictionString"].split() or [""])[0] for row in rows}


def read_synset_ids(path: str | Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat or a text file of `<id> <wnid>` lines."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--val_synsets {str(path)!r} does not exist (the devkit's data/meta.mat)")
    if path.suffix.lower() == ".mat":
        from scipy.io import loadmat

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    ids = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split()
        if len(words) != 2 or not words[0].isdigit():
            raise ValueError(f"{path}:{n}: expected '<ILSVRC2012_ID> <wnid>', got {line!r}")
        ids[int(words[0])] = words[1]
    return ids


def _text_labels(path: Path, synsets_file: str | None) -> dict[str, str]:
    lines = [(n, line.split()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if lines and all(len(w) == 1 and w[0].isdigit() for _, w in lines):  # the devkit's ground truth
        if synsets_file is None:
            raise ValueError(
                f"{path} holds ILSVRC2012_IDs (the devkit's ground truth), which are not class indices: "
                "pass --val_synsets with the devkit's data/meta.mat to map them to synsets"
            )
        ids = read_synset_ids(synsets_file)
        unknown = sorted({int(w[0]) for _, w in lines} - set(ids))
        if unknown:
            raise ValueError(f"{path}: ILSVRC2012_IDs {unknown[:5]} are not in --val_synsets {synsets_file}")
        return {VAL_NAME.format(i): ids[int(w[0])] for i, (_, w) in enumerate(lines, 1)}
    for n, words in lines:
        if len(words) != 2:
            raise ValueError(f"{path}:{n}: expected '<file name> <wnid>' or one ILSVRC2012_ID, got {words}")
    return {Path(w[0]).stem: w[1] for _, w in lines}


def read_val_labels(path: str | Path, synsets_file: str | None = None) -> dict[str, str]:
    """Val file stem (`ILSVRC2012_val_00000001`) -> wnid, from any of the module's labels formats."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--val_labels {str(path)!r} does not exist; {LABELS_HELP}")
    return _kaggle_csv(path) if path.suffix.lower() == ".csv" else _text_labels(path, synsets_file)


def val_entries(val_dir: Path, synsets: list[str], labels: dict[str, str] | None, source: str) -> list[Entry]:
    """Val files labelled by their synset folder or by `labels` (stem -> wnid, read from `source`)."""
    index = {w: i for i, w in enumerate(synsets)}
    entries, _ = folder.scan(val_dir)
    if not entries:
        raise ValueError(f"{val_dir} holds no images: expected {val_dir}/*.JPEG (or pass --val false)")
    out, missing = [], []
    for e in entries:
        rel = e.path.relative_to(val_dir)
        wnid, origin = None, ""
        if len(rel.parts) > 1:  # val/<wnid>/<file>: sorted into synset folders
            wnid, origin = rel.parts[0], f"folder {val_dir / rel.parts[0]}"
        elif labels is not None:
            wnid, origin = labels.get(e.path.stem), source
        if wnid is None:
            missing.append(e.path)
            continue
        if wnid not in index:
            raise ValueError(f"{e.path}: synset {wnid!r} (from {origin}) is not one of the train synsets")
        out.append(dataclasses.replace(e, label=index[wnid]))
    if missing:
        where = f"not in {source}" if labels is not None else "in the flat val folder"
        raise ValueError(
            f"{len(missing)} val images lack a label ({where}), e.g. {missing[0]}; {LABELS_HELP}"
        )
    return out


def encode_adm(job: tuple[Entry, int, int]) -> tuple[Entry, bytes | None, str, str]:
    """(entry, resolution, JPEG quality) -> (entry, JPEG bytes of the ADM centre crop or None, "jpg", error).

    Decoded at full size (no JPEG draft), made RGB by `to_rgb` (ImageNet has CMYK and grayscale JPEGs and
    one PNG named .JPEG), cropped by `adm_center_crop`, stored as JPEG with 4:4:4 chroma.
    """
    entry, size, quality = job
    try:
        img = adm_center_crop(decode_image(entry.path.read_bytes()), size)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
        return entry, buf.getvalue(), "jpg", ""
    except Exception as exc:  # undecodable input is counted by the caller, never fatal
        return entry, None, "", f"{type(exc).__name__}: {exc}"
