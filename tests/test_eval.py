"""`vlt eval`: identical sets, numpy/scipy oracles, the three input kinds, reference statistics, failures.

The Inception path cannot run here (no torch-fidelity, no weights offline): its plumbing is checked
with a STAND-IN network of the same interface; those values are not Inception's and are never compared.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from vlt.cli import main as vlt
from vlt.metrics import generation
from vlt.metrics.generation import Features, Reference

# ---------------------------------------------------------------------------------------- oracles


def oracle_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The classic formula with scipy's sqrtm on np.cov moments (ADM's evaluator does the same)."""
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def oracle_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3: off-diagonal means within each set."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3), ((y @ y.T / d + 1) ** 3), ((x @ y.T / d + 1) ** 3)
    n, m = len(x), len(y)
    within = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def oracle_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Brute force: squared distances, the k-th neighbour radius (index k: index 0 is the point itself)."""

    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_real, r_fake = np.sort(sq(real, real), 1)[:, k], np.sort(sq(fake, fake), 1)[:, k]
    precision = (sq(fake, real) <= r_real[None]).any(1).mean()
    recall = (sq(real, fake) <= r_fake[None]).any(1).mean()
    return float(precision), float(recall)


def oracle_is(logits: np.ndarray, split: int) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        part = p[i : i + split]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def gaussian(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mix = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ (np.eye(d) + 0.4 * mix) + shift


# ---------------------------------------------------------------------------------------- image sets


@pytest.fixture(scope="module")
def image_sets(tiny_shards, tmp_path_factory) -> dict[str, str]:
    """The tiny val shards as shards, as an ADM npz and as a PNG folder: the same pixels, the same order.

    The npz and the folder are written from a tarfile + PIL reading of the shards, not the tool's reader.
    """
    root = tmp_path_factory.mktemp("eval_sets")
    images, labels = [], []
    for shard in sorted(Path(tiny_shards["root"]).glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    images.append(
                        np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    )
                elif member.name.endswith(".cls"):
                    labels.append(int(tar.extractfile(member).read()))
    arr = np.stack(images)  # (N, H, W, 3) uint8
    np.savez(root / "val.npz", arr, np.asarray(labels))
    (root / "folder").mkdir()
    for i, image in enumerate(arr):
        Image.fromarray(image).save(root / "folder" / f"{i:04d}.png")
    half = root / "half.npz"
    np.savez(half, arr[: len(arr) // 2])
    return {"shards": tiny_shards["val"], "npz": str(root / "val.npz"), "folder": str(root / "folder"),
            "half": str(half), "root": str(root)}  # fmt: skip


def run_eval(samples: str, ref: str, out: Path, *extra: str) -> dict:
    vlt(["-q", "eval", samples, "--ref", ref, "--out", str(out), "--replicates", "20", *extra])
    return json.loads(out.read_text())["metrics"]


# ---------------------------------------------------------------------------------------- tests


def test_identical_sets_give_zero_fd_full_precision_recall_and_kid_of_the_oracle(
    image_sets, tiny_vltnet, tmp_path
):
    m = run_eval(image_sets["npz"], image_sets["npz"], tmp_path / "r.json", "--features", "vltnet",
                 "--weights", str(tiny_vltnet))  # fmt: skip
    # Identical sets: equal means and covariances, so the Fréchet distance is 0 up to float error (no
    # sample-size bias term: both sides are the same sample). Unbiased KID is not 0 on identical sets:
    # it is the oracle's value on identical features (<= 0), and precision = recall = 1.
    assert abs(m["fd_vltnet"]["value"]) < 1e-6
    assert m["precision_vltnet"]["value"] == 1.0 and m["recall_vltnet"]["value"] == 1.0
    assert m["kid_vltnet"]["value"] <= 1e-12
    assert "fid" not in m and not any("fid" in name for name in m if name != "sfid")


def test_proxy_features_are_named_and_identical_sets_give_zero(image_sets, tmp_path):
    m = run_eval(image_sets["folder"], image_sets["folder"], tmp_path / "r.json", "--features", "proxy")
    # 64 images, 224 proxy features: a rank-63 covariance whose zero eigenvalues come out as +-1e-13 of
    # tr S ~ 1e3; their square roots leave ~1e-6 in the trace term. Still "0 up to float error".
    assert abs(m["fd_proxy"]["value"]) < 1e-4 and m["precision_proxy"]["value"] == 1.0


def test_scores_on_random_features_match_numpy_scipy_oracles():
    real, fake = gaussian(0, 300, 8), gaussian(1, 240, 8, shift=0.3)
    ref = Reference.of(Features(torch.from_numpy(real)))
    out = generation.evaluate(Features(torch.from_numpy(fake)), ref, kind="vltnet", replicates=0)
    assert out["fd_vltnet"].value == pytest.approx(oracle_fd(real, fake), rel=1e-8, abs=1e-10)
    assert out["kid_vltnet"].value == pytest.approx(oracle_kid(real, fake), rel=1e-8, abs=1e-12)
    precision, recall = oracle_precision_recall(real, fake)
    assert (out["precision_vltnet"].value, out["recall_vltnet"].value) == (precision, recall)
    with_intervals = generation.evaluate(Features(torch.from_numpy(fake)), ref, kind="vltnet", replicates=30)
    assert with_intervals["fd_vltnet"].value == pytest.approx(out["fd_vltnet"].value)
    assert with_intervals["fd_vltnet"].half > 0 and with_intervals["kid_vltnet"].method == "bootstrap"


def test_large_sets_take_the_point_path_with_the_same_values(monkeypatch):
    real, fake = gaussian(2, 100, 6), gaussian(3, 100, 6, shift=0.2)
    monkeypatch.setattr(generation, "BOOTSTRAP_MAX", 50)  # as if both sides were over the bootstrap limit
    ref = Reference.of(Features(torch.from_numpy(real)))
    out = generation.evaluate(Features(torch.from_numpy(fake)), ref, kind="proxy", replicates=30)
    assert (out["precision_proxy"].value, out["recall_proxy"].value) == oracle_precision_recall(real, fake)
    # Subsets of min(1000, N, M) = 100 = N = M: every subset is the whole set, so KID equals the oracle.
    assert out["kid_proxy"].method == "subsets" and out["kid_proxy"].half is None
    assert out["kid_proxy"].value == pytest.approx(oracle_kid(real, fake), rel=1e-8)


def test_inception_score_matches_adm_definition_with_splits_of_5000():
    logits = np.random.default_rng(0).normal(size=(7000, 12)) * 3
    assert generation.inception_score(torch.from_numpy(logits)) == pytest.approx(
        oracle_is(logits, 5000), rel=1e-10
    )


def test_npz_folder_and_shards_give_the_same_numbers(image_sets, tiny_vltnet, tmp_path):
    extra = ("--features", "vltnet", "--weights", str(tiny_vltnet), "--batch-size", "24")
    by_kind = {kind: run_eval(image_sets[kind], image_sets["half"], tmp_path / f"{kind}.json", *extra)
               for kind in ("npz", "folder", "shards")}  # fmt: skip
    assert by_kind["npz"]["fd_vltnet"]["value"] > 0
    assert by_kind["npz"] == by_kind["folder"] == by_kind["shards"]


def test_precomputed_reference_statistics_give_the_same_fd(image_sets, tiny_vltnet, tmp_path):
    extra = ("--features", "vltnet", "--weights", str(tiny_vltnet))
    stats = tmp_path / "ref_stats.npz"
    from_images = run_eval(image_sets["half"], image_sets["shards"], tmp_path / "a.json", *extra,
                           "--save-ref", str(stats))  # fmt: skip
    assert set(np.load(stats).files) == {"mu", "sigma", "features"}  # ADM's keys; no images
    from_stats = run_eval(image_sets["half"], str(stats), tmp_path / "b.json", *extra)
    assert from_stats["fd_vltnet"] == from_images["fd_vltnet"]
    # No reference images: the k-NN and kernel scores are reported unavailable, not guessed.
    assert (
        from_stats["precision_vltnet"]["value"] is None
        and "statistics only" in from_stats["kid_vltnet"]["note"]
    )
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["ref_statistics"] == "precomputed"


def test_adm_statistics_are_not_mixed_with_another_extractor(image_sets, tiny_vltnet, tmp_path):
    adm_like = tmp_path / "adm_ref.npz"  # an ADM batch: Inception statistics, no `features` entry, no images
    np.savez(adm_like, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="statistics of 'inception'"):
        run_eval(image_sets["half"], str(adm_like), tmp_path / "r.json", "--features", "vltnet",
                 "--weights", str(tiny_vltnet))  # fmt: skip


def test_is_and_sfid_are_unavailable_without_inception(image_sets, tiny_vltnet, tmp_path):
    m = run_eval(image_sets["half"], image_sets["npz"], tmp_path / "r.json", "--features", "vltnet",
                 "--weights", str(tiny_vltnet))  # fmt: skip
    for name in ("is", "sfid"):
        assert m[name]["value"] is None and "Inception-only" in m[name]["note"]


def test_missing_inception_weights_fail_before_any_image_is_read(image_sets, tmp_path, monkeypatch):
    import vlt.tools.evaluate as tool

    def no_reading(*args, **kwargs):
        raise AssertionError("an image set was opened before the weights were checked")

    monkeypatch.setattr(tool, "open_set", no_reading)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # an empty torch hub cache
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(ValueError, match=re.escape(str(missing)) + ".*torch-fidelity/releases"):
        tool.evaluate_samples(
            image_sets["npz"], image_sets["npz"], weights=str(missing), out=str(tmp_path / "r")
        )
    with pytest.raises(ValueError, match=r"weights-inception-2015-12-05-6726825d\.pth.*--features vltnet"):
        tool.evaluate_samples(image_sets["npz"], image_sets["npz"], out=str(tmp_path / "r"))


class StandIn(nn.Module):
    """NOT Inception: a random network with torch-fidelity's FeatureExtractorInceptionV3 interface
    (uint8 in, ('2048', 'logits_unbiased') out, a Mixed_6d.branch1x1 giving (B, 192, 17, 17))."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        assert features_list == ["2048", "logits_unbiased"] and Path(feature_extractor_weights_path).is_file()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2)  # 35 -> 17
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Sequential(nn.Conv2d(8, 192, 1), nn.ReLU())
        self.fc = nn.Linear(192, 2048)
        self.logits = nn.Linear(2048, 1008, bias=False)

    def forward(self, x):
        assert x.dtype == torch.uint8
        x = nn.functional.interpolate(x.float() / 128 - 1, size=(35, 35), mode="bilinear")
        spatial = self.Mixed_6d.branch1x1(self.stem(x))  # (B, 192, 17, 17)
        pool = self.fc(spatial.mean((2, 3)))  # (B, 2048)
        return pool, self.logits(pool)


def test_inception_plumbing_with_a_stand_in_network(image_sets, tmp_path, monkeypatch):
    """Hook, shapes and names of the Inception path (values are the stand-in's, not Inception's)."""
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = StandIn
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")
    from vlt.metrics.eval_features import build_extractor

    feats = build_extractor("inception", str(weights))(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert (
        feats.pool.shape == (2, 2048)
        and feats.spatial.shape == (2, 17 * 17 * 7)
        and feats.logits.shape == (2, 1008)
    )
    m = run_eval(image_sets["half"], image_sets["npz"], tmp_path / "r.json", "--weights", str(weights))
    assert list(m) == ["fid", "sfid", "is", "kid", "precision", "recall"]
    assert all(np.isfinite(m[name]["value"]) for name in m) and m["is"]["value"] >= 1.0
