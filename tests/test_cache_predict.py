"""`vlt cache-latents` on Lightning's predict loop: 2 DDP processes = 1, resume by image shard, refusals."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.conftest import ROOT
from vlt.data.cache import LatentCache
from vlt.lit.cacher import UnitWriter
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.stages import VariableLengthTokenizer, export
from vlt.tools.cache_latents import cache_latents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)  # N = 32, 32x32 images
    tok = VariableLengthTokenizer(cfg, MergePattern.contiguous(32, [4, 32]))
    return export(tok.eval(), tmp_path_factory.mktemp("tok") / "tokenizer")


def _latents(root: Path, split: str = "train") -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """{key: (latent, flipped latent, json meta)} of every cached sample, whatever shard holds it."""
    out = {}
    files = [str(f) for f in LatentCache(root).shard_files(split)]
    for sample in wds.WebDataset(files, shardshuffle=False, empty_check=False):
        pair = [np.load(io.BytesIO(sample[name])) for name in ("latent.npy", "latent_flip.npy")]
        assert sample["__key__"] not in out  # every sample once
        out[sample["__key__"]] = (pair[0], pair[1], json.loads(sample["json"]))
    return out


def _vlt_cache(*args: str, devices: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vlt.cli", "cache-latents", *args, "--devices", str(devices)]
    proc = subprocess.run(
        [*cmd, "--accelerator", "cpu"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.ddp
def test_two_ddp_processes_cache_exactly_the_latents_of_one(tokenizer, tiny_shards, tmp_path):
    # 4 image shards of 64: units 0, 2 on rank 0 and 1, 3 on rank 1; batches of 24 leave short ones.
    common = {"tokenizer": str(tokenizer), "shards": tiny_shards["train"], "batch_size": 24, "num_workers": 0}
    cache_latents(**common, out=str(tmp_path / "one"), accelerator="cpu")
    args = ["--tokenizer", str(tokenizer), "--shards", tiny_shards["train"], "--batch-size", "24"]
    proc = _vlt_cache(*args, "--num-workers", "1", "--out", str(tmp_path / "two"), devices=2)
    assert "on 2 processes" in proc.stdout
    one, two = _latents(tmp_path / "one"), _latents(tmp_path / "two")
    assert len(one) == 256 and one.keys() == two.keys()
    for key, (latent, flipped, meta) in one.items():
        np.testing.assert_allclose(two[key][0], latent, atol=1e-6, rtol=0)
        np.testing.assert_allclose(two[key][1], flipped, atol=1e-6, rtol=0)
        assert two[key][2]["label"] == meta["label"]
        np.testing.assert_allclose(two[key][2]["psnr"], meta["psnr"], atol=1e-4)
    a, b = LatentCache(tmp_path / "one"), LatentCache(tmp_path / "two")
    for mine, theirs in zip(a.stats("train"), b.stats("train"), strict=True):
        torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
    assert b.meta("train")["world_size"] == 2 and b.meta("train")["samples"] == 256
    assert sorted(p.name for p in b.shard_files("train")) == [
        "train-r00-000000.tar", "train-r00-000002.tar", "train-r01-000001.tar", "train-r01-000003.tar"
    ]  # fmt: skip
    curves_a, curves_b = a.curves("train"), b.curves("train")
    order = {key: i for i, key in enumerate(curves_a.keys)}
    rows = [order[key] for key in curves_b.keys]
    np.testing.assert_allclose(curves_b.psnr, curves_a.psnr[rows], atol=1e-4)
    # A job killed after rank 1 made unit 3 but before the end, resumed on ONE process: only unit 3's
    # record was lost, so only unit 3 is encoded again (now by rank 0), and rank 1's stale shard goes.
    for done in (tmp_path / "two").glob("done-train-r*.json"):
        done.unlink()
    (tmp_path / "two/units-train/u000003.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in b.shard_files("train") if not p.name.endswith("000003.tar")}
    cache_latents(**common, out=str(tmp_path / "two"), accelerator="cpu")
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    names = [p.name for p in b.shard_files("train")]
    assert "train-r00-000003.tar" in names and "train-r01-000003.tar" not in names
    assert b.meta("train")["world_size"] == 1 and _latents(tmp_path / "two").keys() == one.keys()


def test_a_killed_run_resumes_without_encoding_finished_shards(tokenizer, tiny_shards, tmp_path, monkeypatch):
    common = {"tokenizer": str(tokenizer), "shards": tiny_shards["train"], "out": str(tmp_path / "cache")}
    common |= {"batch_size": 16, "num_workers": 0, "accelerator": "cpu"}
    write = UnitWriter.write_on_batch_end
    batches = []

    def killed_after_one_shard(self, *args, **kwargs):  # 4 batches per unit: die inside the second unit
        batches.append(1)
        if len(batches) == 6:
            raise RuntimeError("killed")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(UnitWriter, "write_on_batch_end", killed_after_one_shard)
    with pytest.raises(RuntimeError, match="killed"):
        cache_latents(**common)
    root = tmp_path / "cache"
    cache = LatentCache(root)
    assert [p.name for p in cache.shard_files("train")] == ["train-r00-000000.tar"]
    assert list(root.glob(".train-r00-000001.tar.tmp*"))  # the half-written shard: never renamed
    assert not cache.is_finished("train")
    finished = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in [root / "train-r00-000000.tar", root / "units-train/u000000.json"]
    }

    monkeypatch.setattr(UnitWriter, "write_on_batch_end", write)
    encoded = []
    encode = VariableLengthTokenizer.encode
    monkeypatch.setattr(
        VariableLengthTokenizer, "encode", lambda self, x: encoded.append(len(x)) or encode(self, x)
    )
    cache_latents(**common)
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == seen for p, seen in finished.items())
    # 3 units of 64 images, each encoded twice (original and flipped) and once more for the curves.
    assert sum(encoded) == 3 * 64 * 2
    assert cache.meta("train")["samples"] == 256 and len(cache.shard_files("train")) == 4
    assert not list(root.glob(".*tmp*"))
    fresh = tmp_path / "fresh"
    cache_latents(**{**common, "out": str(fresh)})
    resumed, uninterrupted = _latents(root), _latents(fresh)
    assert resumed.keys() == uninterrupted.keys()
    for key, (latent, flipped, _meta) in uninterrupted.items():
        assert np.array_equal(resumed[key][0], latent) and np.array_equal(resumed[key][1], flipped)


def test_finished_and_mismatched_splits_are_refused_unless_overwritten(tokenizer, tiny_shards, tmp_path):
    common = {"tokenizer": str(tokenizer), "shards": tiny_shards["val"], "out": str(tmp_path), "split": "val"}
    common |= {"batch_size": 64, "num_workers": 0, "accelerator": "cpu", "distortion": False}
    cache_latents(**common)
    with pytest.raises(FileExistsError, match="--overwrite"):
        cache_latents(**common)
    (tmp_path / "done-val-r0.json").unlink()  # unfinished, but begun without flipped latents
    with pytest.raises(ValueError, match=r"other settings \(flip differ\)"):
        cache_latents(**common, flip=False)
    cache_latents(**common, flip=False, overwrite=True)
    assert LatentCache(tmp_path).meta("val")["flip"] is False
    assert not any(
        name == "latent_flip.npy"
        for s in wds.WebDataset(str(tmp_path / "val-r00-000000.tar"), shardshuffle=False)
        for name in s
    )


def test_an_image_shard_without_a_decodable_sample_is_counted_not_fatal(tokenizer, tiny_shards, tmp_path):
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"not a tar archive" * 100)
    shards = [tiny_shards["val"], str(bad)]
    cache_latents(
        tokenizer=str(tokenizer),
        shards=shards,
        out=str(tmp_path / "c"),
        split="val",
        batch_size=64,
        num_workers=0,
        accelerator="cpu",
        distortion=False,
    )
    cache = LatentCache(tmp_path / "c")
    meta = cache.meta("val")
    assert meta["samples"] == 64 and meta["shard_errors"] >= 1  # counted, and the split finished
    assert [p.name for p in cache.shard_files("val")] == ["val-r00-000000.tar"]  # none for unit 1
    index = json.loads((tmp_path / "c/index-val.json").read_text())["units"]
    assert [u["shard"] for u in index] == ["val-r00-000000.tar", None]
