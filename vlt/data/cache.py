"""The stage-2 latent cache on disk: the one place that knows its file names.

Letters: S cached samples of a split, N slots, C channels, G levels of the merge grid.

    <root>/pattern.json                the tokenizer's global pattern (absent for per-image ToMe)
    <root>/<split>-r<rank>-<u>.tar     webdataset shards: latent.npy (N, C) float32, cls, json meta,
                                       latent_flip.npy (N, C): the latent of the flipped image (optional);
                                       one per image shard u, made by rank <rank>
    <root>/units-<split>/run.json      the settings that decide the latents (a resumed run must match)
    <root>/units-<split>/u<u>.json     the record of a finished unit (its shard, samples, channel sums)
    <root>/units-<split>/u<u>.npz      its rows of the PSNR curves (content-adaptive K)
    <root>/index-<split>.json          every unit of the split: image shard, latent shard, samples
    <root>/stats-<split>-r<rank>.json  partial channel sums (float64), combined over ranks on read
    <root>/done-<split>-r<rank>.json   completion record of one rank's share (samples, skipped, world size)
    <root>/curves-<split>-r<rank>.npz  per-image PSNR curves over the grid (content-adaptive K)
    <root>/allocation.json, k-<split>.npz   a per-image K allocation (`vlt allocate`)

Full N-slot latents are cached, never merged ones: the DiT merges on the fly for any K. Every
writer and reader of these files goes through `LatentCache`.

Resuming: a unit (one image shard) is finished when its record exists and names a shard that exists.
Shards and records are written under temporary names and renamed, the shard first, so a killed job
leaves either a finished unit or files a restart deletes (`begin_unit`), never a half shard that a
reader would trust. The per-rank statistics, curves and completion records are written from the unit
records at the end, for the share of each rank (unit u belongs to rank u % world size).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vlt.models.pattern import MergePattern
from vlt.paths import replace_with

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
        text = json.dumps(pattern.to_dict()).encode()  # every split's job writes the same file: whole only
        return replace_with(self.root / "pattern.json", lambda f: f.write(text))

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

    # --- writing a split one unit (image shard) at a time, resumably ---
    def _units(self, split: str) -> Path:
        return self.root / f"units-{split}"

    def _unit_file(self, split: str, unit: int, suffix: str = "json") -> Path:
        return self._units(split) / f"u{unit:06d}.{suffix}"

    def unit_shard(self, split: str, rank: int, unit: int) -> Path:
        """The latent shard of unit `unit` (image shard number `unit`) as rank `rank` writes it."""
        return self.root / f"{split}-r{rank:02d}-{unit:06d}.tar"

    def check_run(self, split: str, settings: dict[str, Any], *, overwrite: bool) -> bool:
        """True: resume the split's finished units; False: start the split over; an error: stop.

        A finished split is refused and unfinished units made with other settings are not mixed in,
        unless `overwrite`. Read-only, so every rank can ask and reaches the same verdict."""
        done = self.root / f"done-{split}-r0.json"
        if self.is_finished(split):
            if not overwrite:
                raise FileExistsError(
                    f"{done} exists: the {split} cache in {self.root} is finished; pass --overwrite true "
                    "to rebuild it or choose another --out"
                )
            return False
        record = self._units(split) / "run.json"
        old = json.loads(record.read_text()) if record.is_file() else None
        if old is None or old == settings:
            return old is not None
        if not overwrite:
            changed = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
            raise ValueError(
                f"{self._units(split)} holds units of an unfinished run with other settings "
                f"({', '.join(changed)} differ): resume with the same tokenizer, shards, flip, distortion "
                "and precision, pass --overwrite true to start the split over, or choose another --out"
            )
        return False

    def prepare(self, split: str, settings: dict[str, Any], *, resume: bool) -> None:
        """Before any unit is made (one process): start the split over unless `resume`; either way
        remove the end-of-run records and temporary files of an earlier run, and record the settings."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            for path in self.shard_files(split):
                path.unlink()
            shutil.rmtree(self._units(split), ignore_errors=True)
        ends = [
            f"{kind}-{split}-r*.{ext}"
            for kind, ext in (("done", "json"), ("stats", "json"), ("curves", "npz"))
        ]
        stale = [path for pattern in ends for path in self.root.glob(pattern)]
        stale += [self.root / f"index-{split}.json", *self.root.glob(f".{split}-r*.tmp*")]
        for path in stale:
            path.unlink(missing_ok=True)
        self._units(split).mkdir(exist_ok=True)
        for path in self._units(split).glob(".*.tmp*"):
            path.unlink()
        text = json.dumps(settings, indent=2).encode()
        replace_with(self._units(split) / "run.json", lambda f: f.write(text))

    def unit_done(self, split: str, unit: int) -> bool:
        """The unit's record exists and names a shard that exists (or none: no sample decoded)."""
        record = self._unit_file(split, unit)
        if not record.is_file():
            return False
        shard = json.loads(record.read_text())["shard"]
        return shard is None or (self.root / shard).is_file()

    def begin_unit(self, split: str, unit: int) -> None:
        """Remove what an earlier, unfinished attempt at this unit left (a shard of any rank, a record)."""
        for path in [
            *self.root.glob(f"{split}-r*-{unit:06d}.tar"),
            *self.root.glob(f".{split}-r*-{unit:06d}.tar.tmp*"),
        ]:
            path.unlink(missing_ok=True)
        self._unit_file(split, unit).unlink(missing_ok=True)

    def finish_unit(self, split: str, unit: int, record: dict[str, Any], curves: Curves | None) -> None:
        """A unit's curve rows, then its record (last: the record is what makes the unit finished).
        The writer has already renamed the unit's shard (`record["shard"]`) into place."""
        if curves is not None:
            replace_with(self._unit_file(split, unit, "npz"), lambda f: _save_curves(f, curves))
        text = json.dumps(record).encode()
        replace_with(self._unit_file(split, unit), lambda f: f.write(text))

    def unit_records(self, split: str) -> dict[int, dict[str, Any]]:
        """{unit: record} of every finished unit of the split."""
        files = sorted(self._units(split).glob("u*.json"))
        return {int(p.stem[1:]): json.loads(p.read_text()) for p in files}

    def unit_curves(self, split: str, unit: int) -> Curves:
        with np.load(self._unit_file(split, unit, "npz")) as data:
            return _curves_from(dict(data))

    def write_index(self, split: str, index: list[dict[str, Any]]) -> Path:
        """index-<split>.json: one entry per unit (image shard, latent shard, samples, skipped)."""
        text = json.dumps({"split": split, "units": index}, indent=1).encode()
        return replace_with(self.root / f"index-{split}.json", lambda f: f.write(text))

    def write_stats(
        self, split: str, rank: int, count: int, total: torch.Tensor, total_sq: torch.Tensor
    ) -> None:
        """Partial sums over this rank's latents: count values per channel, sum and sum of squares (C,)."""
        stats = {"count": int(count), "sum": total.double().tolist(), "sum_sq": total_sq.double().tolist()}
        replace_with(self._file("stats", split, rank), lambda f: f.write(json.dumps(stats).encode()))

    def finish(self, split: str, rank: int, meta: dict[str, Any]) -> None:
        """The completion record, written last: a split is finished when every rank wrote one."""
        replace_with(self._file("done", split, rank), lambda f: f.write(json.dumps(meta).encode()))

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
        return replace_with(self._file("curves", split, rank, "npz"), lambda f: _save_curves(f, curves))

    def curves(self, split: str) -> Curves:
        """All ranks' curve sidecars of a split; a clear error naming the command when there are none."""
        files = sorted(self.root.glob(f"curves-{split}-r*.npz"))
        if not files:
            raise FileNotFoundError(
                f"no distortion curves for split {split!r} in {self.root}: rebuild the cache with "
                f"`vlt cache-latents --split {split} --out {self.root} --distortion true ...` "
                "(the tokenizer must have a global pattern)"
            )
        parts = []
        for file in files:
            with np.load(file) as data:
                parts.append(_curves_from(dict(data)))
        try:
            return join_curves(parts)
        except ValueError as exc:
            raise ValueError(f"curve sidecars of {split!r} in {self.root}: {exc}") from None

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


def _save_curves(f, curves: Curves) -> None:
    """One npz of curve rows (keys, psnr, label, complexity, png_bytes, grid) into an open file."""
    np.savez(
        f,
        keys=np.asarray(curves.keys, dtype=str),
        psnr=np.asarray(curves.psnr, dtype=np.float32).reshape(len(curves.keys), len(curves.grid)),
        label=np.asarray(curves.label, dtype=np.int64),
        complexity=np.asarray(curves.complexity, dtype=np.int64),
        png_bytes=np.asarray(curves.png_bytes, dtype=np.int64),
        grid=np.asarray(curves.grid, dtype=np.int64),
    )


def _curves_from(data: dict[str, np.ndarray]) -> Curves:
    return Curves(
        keys=[str(k) for k in data["keys"].tolist()],
        psnr=data["psnr"].astype(np.float32).reshape(len(data["keys"]), len(data["grid"])),
        label=data["label"].astype(np.int64),
        complexity=data["complexity"].astype(np.int64),
        png_bytes=data["png_bytes"].astype(np.int64),
        grid=[int(k) for k in data["grid"].tolist()],
    )


def join_curves(parts: list[Curves]) -> Curves:
    """Curve rows of several parts in order; they must share one grid (a ValueError otherwise)."""
    grids = {tuple(p.grid) for p in parts}
    if len(grids) != 1:
        raise ValueError(f"the parts disagree on the grid: {sorted(grids)}")
    grid = list(grids.pop())
    cat = {
        name: np.concatenate([getattr(p, name) for p in parts])
        for name in ("label", "complexity", "png_bytes")
    }
    psnr = np.concatenate([p.psnr.reshape(len(p.keys), len(grid)) for p in parts]).astype(np.float32)
    return Curves(keys=[k for p in parts for k in p.keys], psnr=psnr, grid=grid, **cat)


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
