"""`vlt cache-latents`: encode image shards once with a trained tokenizer, keep the full N slots.

    vlt cache-latents --tokenizer runs/tokenizer-tiny/checkpoints/last.ckpt \
        --shards 'data/synthetic/shards/train-*.tar' --out data/latents/tokenizer-tiny --split train

Letters: B batch, N slots, C channels, G levels of the merge grid.

The tokenizer is a stage-1 checkpoint, a stage-2/3 checkpoint (its tokenizer) or an export folder.
The cache (`vlt.data.cache.LatentCache`) gets the tokenizer's global pattern, one latent shard per image
shard (with the latent of each horizontally flipped image beside the original unless `flip=False`),
channel statistics, an index and per-rank completion records. With a global pattern and
`distortion=True` (the default) every image is also reconstructed at every K of the grid: its PSNR
curve and PNG size go into the sample's json meta and a curves sidecar for `vlt allocate`.

Encoding runs on Lightning's predict loop (`vlt.lit.cacher`): `--accelerator/--devices/--num-nodes` as
for a Trainer (several devices run DDP; `srun` processes under Slurm are picked up by Lightning),
`--precision bf16-mixed` encodes under bf16 autocast (the default on a GPU). Image shard u is rank
u % world's; each finished one is a renamed latent shard plus a record, so a killed or requeued job run
again (on any number of processes) encodes only the image shards without a record.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from vlt import console
from vlt.data.cache import Curves, LatentCache, join_curves
from vlt.data.labels import data_classes
from vlt.data.shards import resolve_shards, shard_info
from vlt.paths import check_name
from vlt.stages import VariableLengthTokenizer, load
from vlt.tools.predicting import default_precision, predict_trainer


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a module's weights: a resumed run must encode with the same tokenizer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_latents(
    *,
    tokenizer: str,
    shards: str | list[str],
    out: str,
    split: str = "train",
    batch_size: int = 256,
    num_workers: int = 1,
    overwrite: bool = False,
    distortion: bool = True,
    flip: bool = True,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str | None = None,
) -> Path:
    """Encode image shards with a tokenizer into latent shards plus statistics (resumable).

    Args:
        tokenizer: a stage-1 checkpoint (EMA weights when EMA was on), a stage-2/3 checkpoint or an
            export folder.
        shards: image shard spec (paths, brace/glob patterns, lists, `pipe:` urls); one latent shard
            is written per image shard.
        out: output folder of the cache.
        split: name of this split ("train" statistics normalise every split).
        batch_size: images per encoder call, on each device.
        num_workers: decode workers per process.
        overwrite: rebuild a finished split (or one begun with other settings) instead of refusing.
        distortion: also measure per-image PSNR at every K of the pattern (G extra decodes per image)
            for content-adaptive allocation; ignored for per-image (ToMe) tokenizers.
        flip: also store the latent of the horizontally flipped image (`latent_flip.npy`), which
            stage-2 training draws 50/50 with the original (the reference's augmentation; one more
            encode per image).
        accelerator: Lightning's accelerator ("auto", "gpu", "cpu").
        devices: devices (= processes) per node; more than one runs DDP.
        num_nodes: nodes (under Slurm: the job's --nodes; `make cache-latents LAUNCH=slurm` sets both).
        precision: Lightning's precision, e.g. "bf16-mixed" (default: bf16-mixed on a GPU, 32-true on CPU).
    """
    check_name(split, "--split")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --num-workers >= 0, got {batch_size}, {num_workers}")
    urls = resolve_shards(shards)
    model = load(tokenizer, part="tokenizer").eval()
    cfg, grid = model.cfg, (model.ks if model.pattern is not None and distortion else [])
    precision = precision or default_precision(accelerator)
    settings = {"tokenizer": fingerprint(model), "shards": urls, "image_size": cfg.image_size, "flip": flip}
    settings |= {"distortion_grid": grid, "precision": precision}
    cache = LatentCache(out)
    resume = cache.check_run(split, settings, overwrite=overwrite)
    sizes = {"image_size": cfg.image_size, "batch_size": batch_size, "num_workers": num_workers}
    run = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "precision": precision}
    encode_split(model, cache, split, urls, settings, resume=resume, sizes=sizes, run=run, source=tokenizer)
    return cache.root


def encode_split(
    model: VariableLengthTokenizer,
    cache: LatentCache,
    split: str,
    urls: list[str],
    settings: dict,
    *,
    resume: bool,
    sizes: dict,
    run: dict,
    source: str,
) -> None:
    """The units still missing on Lightning's predict loop, then (rank zero) the split's end records."""
    from vlt.lit.cacher import CacheData, LitCacher, UnitWriter  # only encoding pays for Lightning

    cfg, grid, flip = model.cfg, settings["distortion_grid"], settings["flip"]
    data = CacheData(cache, split, urls, settings, resume=resume, **sizes)
    classes = data_classes(shard_info(urls))
    writer = UnitWriter(cache, split, urls, channels=cfg.channels, classes=classes, grid=grid)
    trainer = predict_trainer("cache-latents", [writer], cache.root, **run)
    start = time.time()
    trainer.predict(LitCacher(model, flip=flip, grid=grid), datamodule=data, return_predictions=False)
    # Every rank's units are on disk before rank zero reads their records (outside the loop: a rank
    # with nothing left may skip it).
    trainer.strategy.barrier("vlt-cache-units")
    if trainer.is_global_zero:
        meta = {"tokenizer": str(source), "world_size": trainer.world_size, "flip": flip}
        meta |= {"precision": run["precision"], "n_slots": cfg.n_slots, "channels": cfg.channels}
        meta |= {"distortion_grid": grid, "seconds": round(time.time() - start, 1)}
        totals = finish_split(cache, split, urls, meta, model)
        _summary(cache, split, totals, writer, trainer.world_size)


def finish_split(
    cache: LatentCache, split: str, urls: list[str], meta: dict, model: VariableLengthTokenizer
) -> dict[str, int]:
    """From the unit records: the index, then per rank's share statistics, curves and the completion
    record (last). Returns the split's samples, skipped samples and shard errors."""
    from vlt.lit.cacher import rank_units

    records = cache.unit_records(split)
    missing = [u for u in range(len(urls)) if u not in records or not cache.unit_done(split, u)]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(urls)} image shards of {split} have no finished latent shard in "
            f"{cache.root} (first: {urls[missing[0]]}): run the same command again to make them"
        )
    fields = ("unit", "url", "shard", "samples", "skipped", "shard_errors")
    cache.write_index(split, [{name: records[u][name] for name in fields} for u in range(len(urls))])
    if model.pattern is not None:
        cache.save_pattern(model.pattern)
    totals = {"samples": 0, "skipped": 0, "shard_errors": 0}
    for rank in range(meta["world_size"]):
        share = rank_units(len(urls), rank, meta["world_size"])
        counts = {name: sum(records[u][name] for u in share) for name in totals}
        sums = [
            np.sum([records[u][name] for u in share] or [[0.0] * meta["channels"]], axis=0)
            for name in ("sum", "sum_sq")
        ]
        cache.write_stats(split, rank, counts["samples"] * meta["n_slots"], *map(torch.from_numpy, sums))
        if meta["distortion_grid"]:
            cache.save_curves(split, rank, _share_curves(cache, split, share, meta["distortion_grid"]))
        cache.finish(split, rank, {**meta, **counts, "units": len(share)})
        totals = {name: totals[name] + counts[name] for name in totals}
    return totals


def _share_curves(cache: LatentCache, split: str, units: list[int], grid: list[int]) -> Curves:
    if not units:
        empty = np.zeros(0, dtype=np.int64)
        psnr = np.zeros((0, len(grid)), dtype=np.float32)
        return Curves(keys=[], psnr=psnr, label=empty, complexity=empty, png_bytes=empty, grid=grid)
    return join_curves([cache.unit_curves(split, u) for u in units])


def _summary(cache: LatentCache, split: str, totals: dict[str, int], writer, world: int) -> None:
    meta = cache.meta(split)
    line = (
        f"{totals['samples']} {split} latents ({meta['n_slots']}x{meta['channels']}), {totals['skipped']} "
        f"skipped, {totals['shard_errors']} shard errors, {meta['seconds']} s on {world} processes"
    )
    nxt = "make train-dit" if split != "train" else f"vlt cache-latents ... --split val --out {cache.root}"
    console.summary(
        f"cache-latents: {line}",
        where=cache.root,
        files=sorted(p.name for p in cache.root.iterdir() if split in p.name and p.is_file()),
        numbers={
            "image shards encoded by rank 0 (others were done or on other ranks)": writer.units,
            "rank 0 images per second": writer.images_per_second,
        },
        next_steps=[nxt],
    )
