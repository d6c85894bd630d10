"""Real-image FID statistics, computed once and cached on disk across validations and runs.

Letters: B batch, F feature dimension.

A cache entry is keyed by (dataset id, extractor name, resolution, number of images) and holds the
float64 mean mu (F,), covariance sigma (F, F) and count n as an .npz file. Loading puts the exact
torchmetrics sums back into the metric, on rank zero only: torchmetrics sums every state across
ranks on `compute()`, so the real side counts once while the generated side is accumulated by all
ranks as usual.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance


@dataclass(frozen=True)
class RealStatsKey:
    """What real statistics depend on; different values never share a cache file."""

    dataset: str
    extractor: str
    resolution: int
    num_images: int

    @property
    def filename(self) -> str:
        dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", self.dataset).strip("_") or "data"
        return f"{dataset}__{self.extractor}__r{self.resolution}__n{self.num_images}.npz"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


class RealStats:
    """Disk cache of real statistics for torchmetrics' FID (see the module docstring).

    Args:
        cache_dir: folder of the .npz files; share it between runs to compute each entry once.
    """

    def __init__(self, *, cache_dir: str | Path = "runs/.fid_cache") -> None:
        self.cache_dir = Path(cache_dir)

    def path(self, key: RealStatsKey) -> Path:
        return self.cache_dir / key.filename

    def exists(self, key: RealStatsKey) -> bool:
        """True on every rank only when rank zero sees the file, so all ranks take the same branch."""
        found = torch.tensor(float(self.path(key).is_file()), device=_device())
        if _distributed():
            dist.broadcast(found, src=0)
        return bool(found.item())

    def save(self, key: RealStatsKey, mu: np.ndarray, sigma: np.ndarray, n: int) -> Path:
        """Write atomically (a temporary file then a rename): concurrent runs never read half a file."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(n))
        os.replace(tmp, path)
        return path

    def load(self, key: RealStatsKey) -> tuple[np.ndarray, np.ndarray, int]:
        with np.load(self.path(key)) as data:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), int(data["n"])

    def prepare(self, fid: FrechetInceptionDistance, key: RealStatsKey, images: Iterable[Tensor]) -> bool:
        """Fill `fid`'s real side from the cache, or from `images` (each rank its share) and cache it.

        Call on every rank with the same key. Returns True when real features were computed.
        """
        if self.exists(key):
            # Only rank zero holds the real sums (see load_real_stats): other ranks need no shared disk.
            if _rank() == 0:
                load_real_stats(fid, *self.load(key))
            else:
                clear_real_stats(fid)
            return False
        clear_real_stats(fid)
        for batch in images:
            fid.update(batch.to(fid.device), real=True)
        mu, sigma, n = reduce_real_stats(fid)
        if _rank() == 0:
            self.save(key, mu, sigma, n)
        load_real_stats(fid, mu, sigma, n)
        if _distributed():
            dist.barrier()
        return True


def _device() -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA tensors."""
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def clear_real_stats(fid: FrechetInceptionDistance) -> None:
    fid.real_features_sum.zero_()
    fid.real_features_cov_sum.zero_()
    fid.real_features_num_samples.zero_()


def reduce_real_stats(fid: FrechetInceptionDistance) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and covariance of the real features accumulated on all ranks (float64)."""
    sums = [fid.real_features_sum, fid.real_features_cov_sum, fid.real_features_num_samples]
    sums = [s.detach().to(_device(), torch.float64).clone() for s in sums]
    if _distributed():
        for s in sums:
            dist.all_reduce(s)
    total, cov_sum, n = (s.cpu().numpy() for s in sums)
    n = round(float(n))
    if n < 2:
        raise ValueError(f"real FID statistics need at least 2 images, got {n}")
    mu = total / n
    sigma = (cov_sum - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma, n


def load_real_stats(fid: FrechetInceptionDistance, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    """Set the metric's real sums from (mu, sigma, n): on rank zero; zeros elsewhere (summed on sync)."""
    if mu.shape != tuple(fid.real_features_sum.shape):
        raise ValueError(
            f"cached real statistics have {mu.shape[0]} features, the extractor gives "
            f"{fid.real_features_sum.shape[0]}: delete the stale cache file"
        )
    clear_real_stats(fid)
    if _rank() != 0:
        return
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    cov_sum = torch.as_tensor(sigma, dtype=torch.float64) * (n - 1) + n * torch.outer(mu_t, mu_t)  # (F, F)
    fid.real_features_sum.copy_(mu_t * n)
    fid.real_features_cov_sum.copy_(cov_sum)
    fid.real_features_num_samples.fill_(n)


class RealFeatures:
    """Disk cache of real-image features (N, F) and labels (N,) for scores beyond FID (KID, PR, ...).

    Same keys and folder as `RealStats` (the extractor name carries the feature net's content hash);
    files end in `.features.npz`. Each rank computes its share, the caller gathers; rank zero saves.
    """

    def __init__(self, *, cache_dir: str | Path = "runs/.fid_cache") -> None:
        self.cache_dir = Path(cache_dir)

    def path(self, key: RealStatsKey) -> Path:
        return self.cache_dir / key.filename.replace(".npz", ".features.npz")

    def load(self, key: RealStatsKey) -> tuple[np.ndarray, np.ndarray] | None:
        """(features, labels) or None; every rank reads (the file is small: N x F)."""
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path) as data:
            return data["features"].astype(np.float64), data["labels"].astype(np.int64)

    def save(self, key: RealStatsKey, features: np.ndarray, labels: np.ndarray) -> Path | None:
        """Write atomically on rank zero (other ranks return None)."""
        if _rank() != 0:
            return None
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, features=features, labels=labels)
        os.replace(tmp, path)
        return path
