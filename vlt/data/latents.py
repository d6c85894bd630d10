"""The stage-2 latent cache: encode image shards once with a trained tokenizer, keep the full N slots.

`vlt cache-latents --tokenizer runs/tokenizer-tiny/checkpoints/last.ckpt --shards '...train-*.tar' \
    --out data/latents/tokenizer-tiny --split train`

Writes webdataset shards `<out>/<split>-r<rank>-<n>.tar` with `latent.npy` (N, C) float32, `cls` and
`json` ({label, complexity, key}), readable by `WebDataModule(kind="latents")`; `<out>/merge_table.json`
(the tokenizer's global pattern, so the DiT merges exactly as the tokenizer did); per-rank partial
channel statistics `<out>/stats-<split>-r<rank>.json` (sums in float64) and a completion marker per
rank. Full N-slot latents are cached, never merged ones: the DiT merges on the fly for any K.

With a merge table and `distortion=True` (the default) every image is also reconstructed at every K
of the table's grid: the json meta gains `psnr` (G floats, dB) and `png_bytes` (PNG size of the
uint8 image), and `<out>/curves-<split>-r<rank>.npz` collects them for `vlt allocate`
(`vlt.adaptive.distortion`), which then never reads the latent shards.

Under torchrun/srun each rank reads its exactly-once share of the shards (the validation pipeline of
`WebDataModule`) and writes its own files; `latent_stats()` combines the partial sums, so no process
group is needed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

log = logging.getLogger(__name__)


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
) -> Path:
    """Encode image shards with a tokenizer checkpoint into latent shards plus statistics.

    Args:
        tokenizer: a `LitTokenizer` checkpoint (its state_dict holds the EMA weights when EMA was on).
        shards: image shard spec (paths, brace/glob patterns, lists, `pipe:` urls).
        out: output folder of the cache.
        split: name of this split ("train" statistics normalise every split).
        batch_size: images per encoder call.
        num_workers: decode workers.
        shard_size: latents per output shard.
        overwrite: replace a finished cache of this split instead of refusing.
        distortion: also measure per-image PSNR at every K of the merge table (G extra decodes per
            image) for content-adaptive allocation; ignored when the tokenizer has no merge table.
    """
    from vlt.adaptive.distortion import Curves, png_size, psnr_curves, save_curves
    from vlt.checkpoints import load_checkpoint
    from vlt.data.datamodule import WebDataModule
    from vlt.data.labels import check_labels, data_classes
    from vlt.data.transforms import to_uint8
    from vlt.lit.tokenizer import LitTokenizer
    from vlt.paths import check_name

    check_name(split, "--split")
    load_checkpoint(tokenizer, expect="tokenizer", config_key="--tokenizer")
    rank, world = _rank_world()
    root = Path(out)
    done = root / f"done-{split}-r{rank}.json"
    if done.exists() and not overwrite:
        raise FileExistsError(
            f"{done} exists: the {split} cache in {root} is finished; pass --overwrite true "
            "to rebuild it or choose another --out"
        )
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(f"{split}-r{rank:02d}-*.tar"), *root.glob(f"curves-{split}-r{rank}.npz")]:
        stale.unlink()

    model = LitTokenizer.load_from_checkpoint(tokenizer, map_location="cpu").eval()
    cfg = model.tokenizer.cfg
    table = model.merge_table()
    if table is not None and rank == 0:
        table.save(root / "merge_table.json")
    data = WebDataModule(
        val=shards, image_size=cfg.image_size, val_batch_size=batch_size, num_workers=num_workers
    )
    data.setup("validate")
    grid = table.ks if table is not None and distortion else []
    rows: dict[str, list] = {"keys": [], "psnr": [], "label": [], "complexity": [], "png_bytes": []}

    start, count = time.time(), 0
    total = torch.zeros(cfg.channels, dtype=torch.float64)
    total_sq = torch.zeros(cfg.channels, dtype=torch.float64)
    pattern = str(root / f"{split}-r{rank:02d}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink, torch.no_grad():
        for batch in data.val_dataloader():
            check_labels(
                batch["label"], data_classes(data.info), where=f"cache-latents of {shards}", keys=batch["key"]
            )
            z = model.encode(batch["image"]).double()  # (B, N, C)
            total += z.sum(dim=(0, 1))
            total_sq += z.pow(2).sum(dim=(0, 1))
            curves = psnr_curves(model, batch["image"], grid, z=z.float()) if grid else None  # (B, G)
            pixels = to_uint8(batch["image"]) if grid else None  # (B, H, W, 3)
            for i, key in enumerate(batch["key"]):
                meta = {
                    "label": int(batch["label"][i]),
                    "complexity": int(batch["complexity"][i]),
                    "key": key,
                }
                if curves is not None:
                    meta["psnr"] = [float(p) for p in curves[i]]
                    meta["png_bytes"] = png_size(pixels[i])
                    for name in ("key", "psnr", "label", "complexity", "png_bytes"):
                        rows["keys" if name == "key" else name].append(meta[name])
                sink.write(
                    {
                        "__key__": key,
                        "latent.npy": z[i].float().numpy(),
                        "cls": str(meta["label"]),
                        "json": meta,
                    }
                )
            count += len(batch["key"])
    stats = {"count": count * cfg.n_slots, "sum": total.tolist(), "sum_sq": total_sq.tolist()}
    (root / f"stats-{split}-r{rank}.json").write_text(json.dumps(stats))
    if grid:
        save_curves(root / f"curves-{split}-r{rank}.npz", Curves(**rows, grid=grid))
    meta = {
        "tokenizer": str(tokenizer),
        "n_slots": cfg.n_slots,
        "channels": cfg.channels,
        "world_size": world,
        "samples": count,
        "skipped": data.skipped,
        "seconds": round(time.time() - start, 1),
        "distortion_grid": grid,
    }
    done.write_text(json.dumps(meta))
    print(
        f"cache-latents: {count} {split} latents ({cfg.n_slots}x{cfg.channels}) on rank {rank}/{world}, "
        f"{data.skipped} skipped, {meta['seconds']} s -> {root}"
    )
    return root


def cache_meta(root: str | Path, split: str = "train") -> dict:
    """The completion record of a cache split; a clear error when the cache is missing or unfinished."""
    root = Path(root)
    done = sorted(root.glob(f"done-{split}-r*.json"))
    if not done:
        raise FileNotFoundError(
            f"no finished '{split}' latent cache in {root}: run `vlt cache-latents "
            f"--split {split} --out {root} ...` (or `make train-dit`) first"
        )
    metas = [json.loads(p.read_text()) for p in done]
    if len(metas) != metas[0]["world_size"]:
        raise ValueError(
            f"latent cache {root} ({split}) is incomplete: {len(metas)} of "
            f"{metas[0]['world_size']} ranks finished"
        )
    return {**metas[0], "samples": sum(m["samples"] for m in metas)}


def latent_stats(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of the cached full latents, combined over ranks in float64."""
    cache_meta(root, split)
    parts = [json.loads(p.read_text()) for p in sorted(Path(root).glob(f"stats-{split}-r*.json"))]
    count = sum(p["count"] for p in parts)
    total = np.sum([p["sum"] for p in parts], axis=0)
    total_sq = np.sum([p["sum_sq"] for p in parts], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
