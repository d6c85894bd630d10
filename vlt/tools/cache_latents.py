"""`vlt cache-latents`: encode image shards once with a trained tokenizer, keep the full N slots.

    vlt cache-latents --tokenizer runs/tokenizer-tiny/checkpoints/last.ckpt \
        --shards 'data/synthetic/shards/train-*.tar' --out data/latents/tokenizer-tiny --split train

Letters: B batch, N slots, C channels, G levels of the merge grid.

The tokenizer is a stage-1 checkpoint, a stage-2/3 checkpoint (its tokenizer) or an export folder.
The cache (`vlt.data.cache.LatentCache`) gets the tokenizer's global pattern, latent shards (with the
latent of each horizontally flipped image beside the original unless `flip=False`), per-rank channel
sums and a completion record. With a global pattern and `distortion=True` (the default)
every image is also reconstructed at every K of the grid: its PSNR curve and PNG size go into the
sample's json meta and a curves sidecar for `vlt allocate`.

Under torchrun/srun each rank reads its exactly-once share of the shards (the validation pipeline
of `WebDataModule`) and writes its own files; statistics combine on read, so no process group is
needed. The rank comes from Slurm's or torchrun's variables (`_rank_world`), and a job run again after
some ranks finished (same world size) redoes only the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from torch import Tensor

from vlt import console
from vlt.adaptive.distortion import png_size, psnr_curves
from vlt.data.cache import Curves, LatentCache
from vlt.data.datamodule import WebDataModule
from vlt.data.labels import check_labels, data_classes
from vlt.data.transforms import to_uint8
from vlt.paths import check_name
from vlt.stages import VariableLengthTokenizer, load
from vlt.types import ImageBatch


def _rank_world() -> tuple[int, int]:
    """This process's global rank and the world size, found the way Lightning's Trainer finds them: a
    Slurm job step's SLURM_PROCID/SLURM_NTASKS (so `srun` over several nodes works), torchrun's
    RANK/WORLD_SIZE, else 0 of 1 (`_rank_env` hands a Slurm rank to webdataset, which reads only
    RANK/WORLD_SIZE)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        slurm = SLURMEnvironment()
        return slurm.global_rank(), slurm.world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def _rank_env(rank: int, world: int) -> Iterator[None]:
    """RANK/WORLD_SIZE set to this process's rank for the block (webdataset's shard split reads them),
    restored afterwards, so an in-process call (a notebook, a test) leaves the environment as it was."""
    saved = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE")}
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _rank_finished(cache: LatentCache, split: str, rank: int, world: int) -> bool:
    """This rank's part of an unfinished split was written by an earlier run of the same world size: a
    restarted job (killed, requeued) redoes only the ranks without a completion record. A split that
    every rank finished is still refused (or rebuilt with --overwrite) by `LatentCache.start`."""
    done = cache._file("done", split, rank)  # the cache's own layout of completion records
    if not done.is_file() or cache.is_finished(split):
        return False
    if json.loads(done.read_text()).get("world_size") != world:
        return False
    print(f"cache-latents: rank {rank}/{world} of {split} is finished in {cache.root}; skipping it")
    return True


@dataclass
class _Totals:
    """Running channel sums of the latents and the curve rows of one rank."""

    channels: int
    count: int = 0
    total: Tensor = field(init=False)
    total_sq: Tensor = field(init=False)
    rows: dict[str, list] = field(default_factory=lambda: {n: [] for n in Curves._fields if n != "grid"})

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.channels, dtype=torch.float64)
        self.total_sq = torch.zeros(self.channels, dtype=torch.float64)


def _write_batch(
    model: VariableLengthTokenizer, batch: ImageBatch, grid: list[int], sink, totals: _Totals, flip: bool
) -> None:
    """Encode one batch, update the sums and write one latent sample per image (labels checked); with
    `flip` also the latent of each horizontally flipped image (statistics stay those of the originals)."""
    z = model.encode(batch.image).double()  # (B, N, C)
    z_flip = model.encode(batch.image.flip(-1)) if flip else None  # (B, N, C)
    totals.total += z.sum(dim=(0, 1))
    totals.total_sq += z.pow(2).sum(dim=(0, 1))
    totals.count += len(batch.key)
    curves = psnr_curves(model, batch.image, grid, z=z.float()) if grid else None  # (B, G)
    pixels = to_uint8(batch.image) if grid else None  # (B, H, W, 3)
    for i, key in enumerate(batch.key):
        meta = {"label": int(batch.label[i]), "complexity": int(batch.complexity[i]), "key": key}
        if curves is not None:
            meta["psnr"] = [float(p) for p in curves[i]]
            meta["png_bytes"] = png_size(pixels[i])
            for name in totals.rows:
                totals.rows[name].append(meta["key" if name == "keys" else name])
        sample = {"__key__": key, "latent.npy": z[i].float().numpy(), "cls": str(meta["label"]), "json": meta}
        if z_flip is not None:
            sample["latent_flip.npy"] = z_flip[i].float().numpy()
        sink.write(sample)


def _finish(
    cache: LatentCache, split: str, rank: int, cfg, totals: _Totals, grid: list[int], meta: dict
) -> None:
    """Statistics, curves and the completion record of this rank's part of the split."""
    cache.write_stats(split, rank, totals.count * cfg.n_slots, totals.total, totals.total_sq)
    if grid:
        cache.save_curves(split, rank, Curves(**totals.rows, grid=grid))
    seconds = round(time.time() - meta.pop("start"), 1)
    meta |= {"n_slots": cfg.n_slots, "channels": cfg.channels, "samples": totals.count, "seconds": seconds}
    cache.finish(split, rank, {**meta, "distortion_grid": grid})
    line = (
        f"{totals.count} {split} latents ({cfg.n_slots}x{cfg.channels}) on rank {rank}/{meta['world_size']}, "
        f"{meta['skipped']} skipped, {seconds} s"
    )
    if rank:
        print(f"cache-latents: {line} -> {cache.root}")
        return
    nxt = "make train-dit" if split != "train" else f"vlt cache-latents ... --split val --out {cache.root}"
    files = sorted(p.name for p in cache.root.iterdir() if split in p.name)
    console.summary(f"cache-latents: {line}", where=cache.root, files=files, next_steps=[nxt])


def cache_latents(
    *,
    tokenizer: str,
    shards: str | list[str],
    out: str,
    split: str = "train",
    batch_size: int = 256,
    num_workers: int = 1,
    shard_size: int = 5000,
    overwrite: bool = False,
    distortion: bool = True,
    flip: bool = True,
) -> Path:
    """Encode image shards with a tokenizer into latent shards plus statistics.

    Args:
        tokenizer: a stage-1 checkpoint (EMA weights when EMA was on), a stage-2/3 checkpoint or an
            export folder.
        shards: image shard spec (paths, brace/glob patterns, lists, `pipe:` urls).
        out: output folder of the cache.
        split: name of this split ("train" statistics normalise every split).
        batch_size: images per encoder call.
        num_workers: decode workers.
        shard_size: latents per output shard.
        overwrite: replace a finished cache of this split instead of refusing.
        distortion: also measure per-image PSNR at every K of the pattern (G extra decodes per image)
            for content-adaptive allocation; ignored for per-image (ToMe) tokenizers.
        flip: also store the latent of the horizontally flipped image (`latent_flip.npy`), which
            stage-2 training draws 50/50 with the original (the reference's augmentation; one more
            encode per image).
    """
    rank, world = _rank_world()
    check_name(split, "--split")
    cache = LatentCache(out)
    if not overwrite and _rank_finished(cache, split, rank, world):
        return cache.root
    cache.start(split, rank, overwrite=overwrite)
    model = load(tokenizer, part="tokenizer").eval()
    cfg, grid = model.cfg, (model.ks if model.pattern is not None and distortion else [])
    if model.pattern is not None and rank == 0:
        cache.save_pattern(model.pattern)
    with _rank_env(rank, world):  # webdataset splits the shards by RANK/WORLD_SIZE
        data = WebDataModule(
            val=shards, image_size=cfg.image_size, val_batch_size=batch_size, num_workers=num_workers
        )
        data.setup("validate")
        start, totals = time.time(), _Totals(cfg.channels)
        with (
            wds.ShardWriter(cache.shard_pattern(split, rank), maxcount=shard_size, verbose=0) as sink,
            torch.no_grad(),
        ):
            total = _batches(data.info, split, batch_size, world)
            for batch in console.progress(data.val_dataloader(), total=total, desc=f"cache-latents {split}"):
                where = f"cache-latents of {shards}"
                check_labels(batch.label, data_classes(data.info), where=where, keys=batch.key)
                _write_batch(model, batch, grid, sink, totals, flip)
        meta = {"tokenizer": str(tokenizer), "world_size": world, "skipped": data.skipped, "start": start}
        meta["flip"] = flip
        _finish(cache, split, rank, cfg, totals, grid, meta)
    return cache.root


def _batches(info: dict | None, split: str, batch_size: int, world: int) -> int | None:
    """Batches of this rank when the shard set's info.json counts the split (for the progress total)."""
    count = ((info or {}).get("counts") or {}).get(split)
    return -(-int(count) // (batch_size * world)) if count else None
