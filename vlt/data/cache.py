"""The stage-2 latent cache on disk: the one place that knows its file names.

Letters: S cached samples of a split, N slots, C channels, G levels of the merge grid.

    <root>/pattern.json                the tokenizer's global pattern (absent for per-image ToMe)
    <root>/<split>-r<rank>-<n>.tar     webdataset shards: latent.npy (N, C) float32, cls, json meta,
                                       latent_flip.npy (N, C): the latent of the flipped image (optional)
    <root>/stats-<split>-r<rank>.json  partial channel sums (float64), combined over ranks on read
    <root>/done-<split>-r<rank>.json   completion record of one rank (samples, skipped, world size)
    <root>/curves-<split>-r<rank>.npz  per-image PSNR curves over the grid (content-adaptive K)
    <root>/allocation.json, k-<split>.npz   a per-image K allocation (`vlt allocate`)

Full N-slot latents are cached, never merged ones: the DiT merges on the fly for any K. Every
writer and reader of these files goes through `LatentCache`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vlt.models.pattern import MergePattern

ALLOCATION = "allocation.json"


class Curves(NamedTuple):
    """The curve sidecars of one split, concatenated over ranks (S samples, G levels)."""

    keys: list[str]
    psnr: np.ndarray  # (S, G) float32 dB
    label: np.ndarray  # (S,) int64
    complexity: np.ndarray  # (S,) int64
    png_bytes: np.ndarray  # (S,) int64
    grid: list[int]


class LatentCache:
    """A latent cache folder (see the module docstring for its layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LatentCache({str(self.root)!r})"

    # --- names ---
    def shards(self, split: str) -> str:
        """The shard spec of a split, as `WebDataModule` reads it."""
        return str(self.root / f"{split}-r*-*.tar")

    def shard_files(self, split: str) -> list[Path]:
        return sorted(self.root.glob(f"{split}-r*-*.tar"))

    def shard_pattern(self, split: str, rank: int) -> str:
        """The `wds.ShardWriter` pattern of one rank's shards."""
        return str(self.root / f"{split}-r{rank:02d}-%06d.tar")

    def _file(self, kind: str, split: str, rank: int, suffix: str = "json") -> Path:
        return self.root / f"{kind}-{split}-r{rank}.{suffix}"

    # --- the pattern ---
    def save_pattern(self, pattern: MergePattern) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return pattern.save(self.root / "pattern.json")

    def has_pattern(self) -> bool:
        return (self.root / "pattern.json").is_file()

    def pattern(self) -> MergePattern:
        if not self.has_pattern():
            raise FileNotFoundError(
                f"latent cache {self.root} has no pattern.json: it was not written by `vlt cache-latents`, "
                "or its tokenizer merges per image (ToMe): a generator cannot know such a pattern "
                "when sampling "
                "(stage 2 needs an lgm, nested or fixed tokenizer)"
            )
        return MergePattern.load(self.root / "pattern.json")

    # --- writing one rank's part of a split ---
    def start(self, split: str, rank: int, *, overwrite: bool) -> None:
        """Refuse to replace a finished split unless asked; remove this rank's partial files."""
        done = self._file("done", split, rank)
        if done.exists() and not overwrite:
            raise FileExistsError(
                f"{done} exists: the {split} cache in {self.root} is finished; pass --overwrite true "
                "to rebuild it or choose another --out"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        stale = [*self.root.glob(f"{split}-r{rank:02d}-*.tar"), self._file("curves", split, rank, "npz")]
        for path in (*stale, done):
            path.unlink(missing_ok=True)

    def write_stats(
        self, split: str, rank: int, count: int, total: torch.Tensor, total_sq: torch.Tensor
    ) -> None:
        """Partial sums over this rank's latents: count values per channel, sum and sum of squares (C,)."""
        stats = {"count": int(count), "sum": total.double().tolist(), "sum_sq": total_sq.double().tolist()}
        self._file("stats", split, rank).write_text(json.dumps(stats))

    def finish(self, split: str, rank: int, meta: dict[str, Any]) -> None:
        """The completion record, written last: a split is finished when every rank wrote one."""
        self._file("done", split, rank).write_text(json.dumps(meta))

    # --- reading ---
    def is_finished(self, split: str) -> bool:
        try:
            self.meta(split)
        except (FileNotFoundError, ValueError):
            return False
        return True

    def meta(self, split: str = "train") -> dict[str, Any]:
        """The completion record of a split; a clear error when it is missing or unfinished."""
        done = sorted(self.root.glob(f"done-{split}-r*.json"))
        if not done:
            raise FileNotFoundError(
                f"no finished '{split}' latent cache in {self.root}: run `vlt cache-latents "
                f"--split {split} --out {self.root} ...` (or `make train-dit`) first"
            )
        metas = [json.loads(p.read_text()) for p in done]
        if len(metas) != metas[0]["world_size"]:
            raise ValueError(
                f"latent cache {self.root} ({split}) is incomplete: {len(metas)} of "
                f"{metas[0]['world_size']} ranks finished"
            )
        return {**metas[0], "samples": sum(m["samples"] for m in metas)}

    def stats(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std (C,) of the cached full latents, combined over ranks in float64."""
        self.meta(split)
        parts = [json.loads(p.read_text()) for p in sorted(self.root.glob(f"stats-{split}-r*.json"))]
        count = sum(p["count"] for p in parts)
        total = np.sum([p["sum"] for p in parts], axis=0)
        total_sq = np.sum([p["sum_sq"] for p in parts], axis=0)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    # --- distortion curves ---
    def save_curves(self, split: str, rank: int, curves: Curves) -> Path:
        """One rank's sidecar npz (keys, psnr, label, complexity, png_bytes, grid)."""
        path = self._file("curves", split, rank, "npz")
        np.savez(
            path,
            keys=np.asarray(curves.keys, dtype=str),
            psnr=np.asarray(curves.psnr, dtype=np.float32).reshape(len(curves.keys), len(curves.grid)),
            label=np.asarray(curves.label, dtype=np.int64),
            complexity=np.asarray(curves.complexity, dtype=np.int64),
            png_bytes=np.asarray(curves.png_bytes, dtype=np.int64),
            grid=np.asarray(curves.grid, dtype=np.int64),
        )
        return path

    def curves(self, split: str) -> Curves:
        """All ranks' curve sidecars of a split; a clear error naming the command when there are none."""
        files = sorted(self.root.glob(f"curves-{split}-r*.npz"))
        if not files:
            raise FileNotFoundError(
                f"no distortion curves for split {split!r} in {self.root}: rebuild the cache with "
                f"`vlt cache-latents --split {split} --out {self.root} --distortion true ...` "
                "(the tokenizer must have a global pattern)"
            )
        parts = [dict(np.load(f)) for f in files]
        grids = {tuple(p["grid"].tolist()) for p in parts}
        if len(grids) != 1:
            raise ValueError(
                f"curve sidecars of {split!r} in {self.root} disagree on the grid: {sorted(grids)}"
            )
        cat = {
            name: np.concatenate([p[name] for p in parts])
            for name in ("psnr", "label", "complexity", "png_bytes")
        }
        return Curves(
            keys=[str(k) for p in parts for k in p["keys"].tolist()],
            psnr=cat["psnr"].astype(np.float32),
            label=cat["label"].astype(np.int64),
            complexity=cat["complexity"].astype(np.int64),
            png_bytes=cat["png_bytes"].astype(np.int64),
            grid=list(grids.pop()),
        )

    # --- allocation ---
    def save_allocation(self, meta: dict[str, Any], ks: dict[str, tuple[list[str], np.ndarray]]) -> Path:
        """Write allocation.json (meta) and one k-<split>.npz per split ({split: (keys, ks)})."""
        for split, (keys, k) in ks.items():
            if len(keys) != len(k):
                raise ValueError(f"split {split}: {len(keys)} keys but {len(k)} K values")
            file = self.root / f"k-{split}.npz"
            np.savez(file, keys=np.asarray(keys, dtype=str), k=np.asarray(k, dtype=np.int64))
        path = self.root / ALLOCATION
        path.write_text(json.dumps(meta, indent=2))
        return path


def load_allocation(path: str | Path) -> dict[str, Any]:
    """allocation.json (a file, or the cache folder holding it); a clear error naming the command."""
    path = Path(path)
    if path.is_dir():
        path = path / ALLOCATION
    if not path.exists():
        raise FileNotFoundError(
            f"no allocation at {path}: run `vlt allocate --cache {path.parent} --budget MEAN_K` first"
        )
    return json.loads(path.read_text())


def load_ks(path: str | Path, split: str) -> dict[str, int]:
    """{key: K_i} of one split from the k-<split>.npz beside allocation.json (a file or its folder)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    file = root / f"k-{split}.npz"
    if not file.exists():
        raise FileNotFoundError(f"no per-image K for split {split!r} at {file}: rerun `vlt allocate`")
    with np.load(file) as data:
        return dict(zip(data["keys"].tolist(), data["k"].tolist(), strict=True))
