"""`vlt data imagenet` on a fake ImageNet tree: labels, counts, the ADM crop, read-back, errors; and
every paper-scale config reads every shard the builder writes for the real ImageNet."""

from __future__ import annotations

import fnmatch
import glob
import inspect
import io
import json
import tarfile
from itertools import chain
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import yaml
from PIL import Image

from vlt.cli import main as vlt
from vlt.data import WebDataModule, builders
from vlt.data.shards import shard_names

ROOT = Path(__file__).resolve().parents[1]
SYNSETS = ["n01440764", "n01443537", "n01484850"]  # sorted: class 0, 1, 2
TRAIN_SIZES = [(300, 140), (100, 70), (40, 90), (31, 20)]  # (W, H): 2, 1, 0 halvings at 32; upsampled
DEVKIT_IDS = {1: "n01484850", 2: "n01440764", 3: "n01443537"}  # not the sorted order, as in the devkit
N_VAL = 6
SIZE = 32


def smooth_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like RGB image: per-channel gradients plus a bright block (JPEG keeps it nearly intact)."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    coef = rng.uniform(-1, 1, (3, 3))
    arr = np.stack([128 + 100 * (c[0] * x + c[1] * y) * c[2] for c in coef], axis=-1)
    arr[h // 4 : h // 2, w // 3 : w // 2] = 250
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def val_synset(i: int) -> str:
    return SYNSETS[i % 3]


@pytest.fixture
def fake_imagenet(tmp_path: Path) -> Path:
    """ROOT/train/<wnid>/*.JPEG (3 x 4, varied shapes), ROOT/val/*.JPEG (6) and every labels format."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ILSVRC"
    for wnid in SYNSETS:
        (root / "train" / wnid).mkdir(parents=True)
        for j, (w, h) in enumerate(TRAIN_SIZES):
            smooth_image(rng, w, h).save(root / "train" / wnid / f"{wnid}_{j}.JPEG", quality=98)
    (root / "val").mkdir()
    names = [f"ILSVRC2012_val_{i:08d}" for i in range(1, N_VAL + 1)]
    for i, name in enumerate(names, 1):
        smooth_image(rng, 50 + 7 * i, 80 - 5 * i).save(root / "val" / f"{name}.JPEG")
    rows = [f"{name},{val_synset(i)} 1 2 30 40 {val_synset(i)} 5 6 7 8" for i, name in enumerate(names, 1)]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    ids = {w: k for k, w in DEVKIT_IDS.items()}
    (root / "ground_truth.txt").write_text("".join(f"{ids[val_synset(i)]}\n" for i in range(1, N_VAL + 1)))
    (root / "synsets.txt").write_text("".join(f"{k} {w}\n" for k, w in DEVKIT_IDS.items()))
    pairs = "".join(f"{name}.JPEG {val_synset(i)}\n" for i, name in enumerate(names, 1))
    (root / "val_pairs.txt").write_text(pairs)
    return root


def build(root: Path, out: Path, *args: str) -> dict:
    """Run `vlt data imagenet` in-process and return the info.json it wrote."""
    vlt(["data", "imagenet", "--root", str(root), "--out", str(out), "--resolution", str(SIZE), *args])
    return json.loads((out / "info.json").read_text())


def read_split(out: Path, split: str, image_size: int = SIZE) -> dict:
    """Keys, images (N, 3, S, S) and labels of one split, through WebDataModule's val pipeline."""
    dm = WebDataModule(
        val=str(out / f"{split}-*.tar"), image_size=image_size, num_workers=0, val_batch_size=5
    )
    dm.setup()
    keys, images, labels = [], [], []
    for batch in dm.val_dataloader():
        keys += batch.key
        images.append(batch.image)
        labels += batch.label.tolist()
    assert dm.skipped == 0
    return {"key": keys, "image": np.concatenate([x.numpy() for x in images]), "label": labels}


def adm_oracle(img: Image.Image, size: int) -> np.ndarray:
    """The ADM centre crop written from the protocol, independently of vlt: (size, size, 3) uint8."""
    img = img.convert("RGB")
    w, h = img.size
    while w >= 2 * size and h >= 2 * size:  # BOX halvings while the short side allows another
        w, h = w // 2, h // 2
        img = img.resize((w, h), resample=Image.BOX)
    short = min(w, h)
    w, h = round(w * size / short), round(h * size / short)
    arr = np.asarray(img.resize((w, h), resample=Image.BICUBIC))
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top : top + size, left : left + size]


def jpeg_member(out: Path, split: str, key: str) -> bytes:
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            if f"{key}.jpg" in names:
                return tar.extractfile(f"{key}.jpg").read()
    raise AssertionError(f"{key}.jpg not in {out}")


def test_build_labels_counts_and_read_back(fake_imagenet, tmp_path):
    out = tmp_path / "shards"
    info = build(
        fake_imagenet, out, "--val_labels", str(fake_imagenet / "LOC_val_solution.csv"), "--shard_size", "5"
    )
    assert info["classes"] == SYNSETS and info["builder"] == "imagenet" and info["image_size"] == SIZE
    assert info["counts"] == {"train": 12, "val": N_VAL} and info["skipped"] == 0
    assert info["split_shards"] == {s: shard_names(s, n, 5) for s, n in (("train", 12), ("val", N_VAL))}
    assert info["shards"] == 3 + 2
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(chain(*info["split_shards"].values()))
    train = read_split(out, "train")
    assert train["image"].shape == (12, 3, SIZE, SIZE)
    assert {k: lab for k, lab in zip(train["key"], train["label"])} == {
        f"{w}/{w}_{j}": c for c, w in enumerate(SYNSETS) for j in range(len(TRAIN_SIZES))
    }
    val = read_split(out, "val")
    assert val["key"] == [f"ILSVRC2012_val_{i:08d}" for i in range(1, N_VAL + 1)]
    assert val["label"] == [SYNSETS.index(val_synset(i)) for i in range(1, N_VAL + 1)]
    assert val["image"].shape == (N_VAL, 3, SIZE, SIZE) and -1 <= val["image"].min() < val["image"].max() <= 1


@pytest.mark.parametrize("j", range(len(TRAIN_SIZES)))
def test_stored_crop_is_the_adm_crop(fake_imagenet, tmp_path, j):
    out = tmp_path / "shards"
    build(fake_imagenet, out, "--val", "false", "--workers", "1", "--progress", "false")
    wnid = SYNSETS[1]
    expected = adm_oracle(Image.open(fake_imagenet / "train" / wnid / f"{wnid}_{j}.JPEG"), SIZE)
    stored = jpeg_member(out, "train", f"{wnid}/{wnid}_{j}")
    buf = io.BytesIO()
    Image.fromarray(expected).save(buf, format="JPEG", quality=95, subsampling=0)
    assert stored == buf.getvalue()  # the oracle's crop, JPEG-encoded as documented
    decoded = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")).astype(int)
    assert decoded.shape == (SIZE, SIZE, 3) and np.abs(decoded - expected).mean() < 2.0


@pytest.mark.parametrize(
    "labels",
    [
        ["--val_labels", "LOC_val_solution.csv"],
        ["--val_labels", "ground_truth.txt", "--val_synsets", "synsets.txt"],
        ["--val_labels", "ground_truth.txt", "--val_synsets", "meta.mat"],
        ["--val_labels", "val_pairs.txt"],
        [],  # val/ sorted into <wnid>/ folders
    ],
    ids=["kaggle-csv", "devkit-txt", "devkit-meta-mat", "pairs", "sorted-folders"],
)
def test_every_val_labels_format(fake_imagenet, tmp_path, labels):
    if "meta.mat" in labels:
        scipy_io = pytest.importorskip("scipy.io")
        rows = np.array(
            [(k, w) for k, w in DEVKIT_IDS.items()], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")]
        )
        scipy_io.savemat(fake_imagenet / "meta.mat", {"synsets": rows})
    if not labels:
        for path in sorted((fake_imagenet / "val").glob("*.JPEG")):
            (path.parent / val_synset(int(path.stem[-8:]))).mkdir(exist_ok=True)
            path.rename(path.parent / val_synset(int(path.stem[-8:])) / path.name)
    args = [str(fake_imagenet / a) if a.endswith((".csv", ".txt", ".mat")) else a for a in labels]
    build(fake_imagenet, tmp_path / "out", *args, "--workers", "1", "--progress", "false")
    val = read_split(tmp_path / "out", "val")
    by_name = {k.rsplit("/", 1)[-1]: lab for k, lab in zip(val["key"], val["label"])}
    assert by_name == {f"ILSVRC2012_val_{i:08d}": SYNSETS.index(val_synset(i)) for i in range(1, N_VAL + 1)}


def test_kaggle_layout(fake_imagenet, tmp_path):
    kaggle = tmp_path / "kaggle"
    (kaggle / "Data").mkdir(parents=True)
    fake_imagenet.rename(kaggle / "Data" / "CLS-LOC")
    csv = kaggle / "Data" / "CLS-LOC" / "LOC_val_solution.csv"
    info = build(kaggle, tmp_path / "out", "--val_labels", str(csv), "--workers", "1", "--progress", "false")
    assert info["counts"] == {"train": 12, "val": N_VAL} and info["classes"] == SYNSETS


def test_errors_name_the_problem_and_the_flag(fake_imagenet, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"--root .*missing.* does not exist"):
        build(tmp_path / "missing", Path(out))
    with pytest.raises(
        ValueError, match=r"6 val images lack a label .*ILSVRC2012_val_00000001.*--val_labels"
    ):
        build(fake_imagenet, Path(out))
    pairs = fake_imagenet / "val_pairs.txt"
    pairs.write_text("".join(pairs.read_text().splitlines(keepends=True)[:-1]))  # drop image 6
    with pytest.raises(
        ValueError, match=r"1 val images lack a label \(not in .*val_pairs.txt\).*val_00000006"
    ):
        build(fake_imagenet, Path(out), "--val_labels", str(pairs))
    pairs.write_text(pairs.read_text() + "ILSVRC2012_val_00000006.JPEG n99999999\n")
    with pytest.raises(
        ValueError, match=r"val_00000006.JPEG: synset 'n99999999' .*not one of the train synsets"
    ):
        build(fake_imagenet, Path(out), "--val_labels", str(pairs))
    with pytest.raises(ValueError, match=r"ILSVRC2012_IDs.*pass --val_synsets"):
        build(fake_imagenet, Path(out), "--val_labels", str(fake_imagenet / "ground_truth.txt"))
    (fake_imagenet / "train" / "tench").mkdir()
    (fake_imagenet / "train" / SYNSETS[0] / f"{SYNSETS[0]}_0.JPEG").rename(
        fake_imagenet / "train" / "tench" / "a.JPEG"
    )
    with pytest.raises(ValueError, match=r"\['tench'\] are not WordNet ids"):
        build(fake_imagenet, Path(out), "--val", "false")


# --- the paper-scale configs read every shard the builder writes ------------------------------------

IMAGENET_COUNTS = {"train": 1_281_167, "val": 50_000}  # ILSVRC-2012


def imagenet_configs() -> list[Path]:
    return sorted(p for p in (ROOT / "conf").glob("*/*.yaml") if "${imagenet}" in p.read_text())


def matched(pattern: str, candidates: list[str]) -> set[str]:
    """The files of `candidates` a shard spec reads, as `vlt.data.shards.resolve_shards` expands it."""
    found = set()
    for url in braceexpand.braceexpand(pattern):
        found |= set(fnmatch.filter(candidates, url)) if glob.has_magic(url) else {url}
    return found


def test_imagenet_configs_exist():
    names = {f"{p.parent.name}/{p.stem}" for p in imagenet_configs()}
    assert {"tokenizer/s", "tokenizer/b", "joint/b"} <= names


@pytest.mark.parametrize("path", imagenet_configs(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_reads_every_imagenet_shard(path):
    shard_size = inspect.signature(builders.imagenet).parameters["shard_size"].default
    written = {s: [f"/in/{n}" for n in shard_names(s, n, shard_size)] for s, n in IMAGENET_COUNTS.items()}
    every = list(chain(*written.values()))
    data = yaml.safe_load(path.read_text())["data"]["init_args"]
    for split in ("train", "val"):
        specs = data[split] if isinstance(data[split], list) else [data[split]]
        got = set().union(*(matched(s.replace("${imagenet}", "/in"), every) for s in specs))
        assert got == set(written[split]), f"{path.name} {split}: {sorted(got ^ set(written[split]))[:3]}"
