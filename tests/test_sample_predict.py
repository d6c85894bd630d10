"""`vlt sample` on Lightning's predict loop: per-index noise, class balance, DDP = one process, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from vlt.models.dit import DiTConfig
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec, indexed_noise
from vlt.stages import LatentGenerator, export
from vlt.tools.sample import sample

TOK = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)  # N = 32, C = 16, 32x32 images
DIT = DiTConfig(width=32, depth=1, heads=2, num_classes=4)
KS = [4, 8, 32]


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    """A tiny untrained generator export (2 sampler steps, guidance on): it decodes on its own."""
    torch.manual_seed(0)
    gen = LatentGenerator(DIT, MergePattern.contiguous(32, KS), tokenizer=TOK, flow=FlowSpec(sample_steps=2))
    return export(gen.eval(), tmp_path_factory.mktemp("gen") / "generator")


def _vlt(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # the same threads in every process
    cmd = [sys.executable, "-m", "vlt.cli", "sample", *args, "--devices", str(devices)]
    cmd += ["--accelerator", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_image_noise_depends_on_seed_index_and_k_only():
    a = indexed_noise(0, [5, 6, 7], 4, 32, 16)  # (3, N, C)
    assert torch.equal(a[1], indexed_noise(0, [6], 4, 32, 16)[0])  # not on the batch it is in
    assert not torch.equal(a[0], indexed_noise(1, [5], 4, 32, 16)[0])  # seed
    assert not torch.equal(a[0], indexed_noise(0, [5], 8, 32, 16)[0])  # K
    assert not torch.equal(a[0], a[1])


def test_npz_in_index_order_with_balanced_labels_and_an_uneven_last_batch(generator, tmp_path):
    written = sample(dit=str(generator), k=[4, 32], count=10, batch_size=4, out=str(tmp_path))
    assert {p.name for p in written} == {"grid_k4.png", "samples_k4.npz", "grid_k32.png", "samples_k32.npz"}
    with np.load(tmp_path / "samples_k4.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]  # the ADM layout
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 4 for i in range(10)]
    assert sorted(p.name for p in (tmp_path / "parts").glob("k4-*.npz")) == [
        "k4-b000000.npz", "k4-b000001.npz", "k4-b000002.npz"
    ]  # fmt: skip
    # Batch composition does not matter: batch size 3 gives the same images (same noise per index).
    other = sample(dit=str(generator), k=[4], count=10, batch_size=3, out=str(tmp_path / "b3"))
    np.testing.assert_allclose(np.load(other[1])["arr_0"].astype(int), images.astype(int), atol=1)


def test_two_ddp_processes_write_exactly_the_npz_of_one(generator, tmp_path):
    # 7 images in batches of 3 at one K: 3 batches dealt over 2 ranks (2 + 1), the last one short.
    args = ["--dit", str(generator), "--k", "8", "--count", "7", "--batch-size", "3", "--seed", "3"]
    _vlt(*args, "--out", str(tmp_path / "one"))
    proc = _vlt(*args, "--out", str(tmp_path / "two"), devices=2)
    assert "processes: 2" in proc.stdout
    one, two = np.load(tmp_path / "one/samples_k8.npz"), np.load(tmp_path / "two/samples_k8.npz")
    assert one["arr_0"].shape == (7, 32, 32, 3)
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    # Resume on 2 processes where rank 0 has nothing left (b0, b2 exist): it must still wait for rank 1.
    (tmp_path / "two/parts/k8-b000001.npz").unlink()
    _vlt(*args, "--out", str(tmp_path / "two"), devices=2)
    assert np.array_equal(np.load(tmp_path / "two/samples_k8.npz")["arr_0"], one["arr_0"])


def test_a_restarted_run_makes_only_the_missing_batches(generator, tmp_path, capsys):
    kwargs = {"dit": str(generator), "k": [4], "count": 9, "batch_size": 2, "out": str(tmp_path)}
    sample(**kwargs)
    first = np.load(tmp_path / "samples_k4.npz")["arr_0"]
    parts = sorted((tmp_path / "parts").glob("k4-*.npz"))
    assert len(parts) == 5
    for lost in (parts[1], parts[4]):  # as if the job had been killed before these batches
        lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in parts if p.exists()}
    capsys.readouterr()
    sample(**kwargs)
    assert "batches made by rank 0 (others were done or on other ranks): 2" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished parts were not redone
    assert parts[1].exists() and parts[4].exists()
    assert np.array_equal(np.load(tmp_path / "samples_k4.npz")["arr_0"], first)
    assert not list((tmp_path / "parts").glob(".*tmp*"))  # no temporary files left


def test_seed_decides_the_images_and_a_resume_must_match_the_settings(generator, tmp_path):
    common = {"dit": str(generator), "k": [4], "count": 4, "batch_size": 4}
    a = np.load(sample(**common, seed=0, out=str(tmp_path / "a"))[1])["arr_0"]
    b = np.load(sample(**common, seed=0, out=str(tmp_path / "b"))[1])["arr_0"]
    c = np.load(sample(**common, seed=1, out=str(tmp_path / "c"))[1])["arr_0"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match=r"other settings \(seed differ\).*another --out"):
        sample(**common, seed=2, out=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"--k \[5\]: this generator serves K = \[4, 8, 32\]"):
        sample(**{**common, "k": [5]}, out=str(tmp_path / "d"))


def test_budget_mode_still_samples_one_k_per_image(generator, tmp_path):
    written = sample(dit=str(generator), budget=12, count=6, out=str(tmp_path))
    assert [p.name for p in written] == ["grid_budget12.png", "samples_budget12.npz"]
    saved = np.load(tmp_path / "samples_budget12.npz")
    assert saved["arr_0"].shape == (6, 32, 32, 3) and set(saved["ks"].tolist()) <= set(KS)


def test_coarse_to_fine_sampling_does_not_depend_on_the_batch(generator, tmp_path):
    """--schedule: each split's fresh noise is indexed like the starting noise, so the batch size (and
    the number of processes) does not change an image; the schedule is capped at each K."""
    runs = [
        sample(
            dit=str(generator),
            k=[8, 32],
            count=6,
            batch_size=b,
            out=str(tmp_path / f"b{b}"),
            schedule="4,32@0.5",
        )
        for b in (2, 3)
    ]
    for k in (8, 32):
        a, b = (np.load(next(p for p in r if p.name == f"samples_k{k}.npz"))["arr_0"] for r in runs)
        np.testing.assert_allclose(a.astype(int), b.astype(int), atol=1)
    plain = sample(dit=str(generator), k=[32], count=6, batch_size=3, out=str(tmp_path / "plain"))
    coarse = np.load(next(p for p in runs[1] if p.name == "samples_k32.npz"))["arr_0"]
    assert np.abs(np.load(plain[1])["arr_0"].astype(int) - coarse.astype(int)).max() > 8
    with pytest.raises(ValueError, match="does not take it"):
        sample(dit=str(generator), budget=8.0, count=4, out=str(tmp_path / "x"), schedule="4,32@0.5")
