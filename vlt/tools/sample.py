"""`vlt sample`: class-conditional images from a stage-2/3 checkpoint or generator export, at one or more K.

Writes, per K, an `.npz` in the ADM layout external FID evaluators read (`arr_0` uint8 (count, H, W, 3),
`arr_1` labels) and a PNG grid of its first 64 images. Sampling runs on Lightning's predict loop
(`vlt.lit.sampler`): `--devices`/`--num-nodes` spread the batches over processes (DDP here, srun under
Slurm), `--precision bf16-mixed` samples in bf16, and each finished batch is a part file under
`<out>/parts/`, so a killed job run again makes only the missing batches. Image i of K depends on
(seed, i, K) only: 1, 2 or 8 processes write the same npz (same batch size, same hardware).

Labels cycle: image i gets `classes[i % len(classes)]` (default every class), so `--count 50000` over
1000 classes is 50 images per class.

With `--budget MEAN_K` (content-adaptive K) each image gets its own K, drawn from the DiT's p(K | class)
tilted to that mean, in one batch in this process (no predict loop); the npz also holds `ks`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlt import console
from vlt.data.transforms import to_uint8
from vlt.panels import panel, save_png
from vlt.stages import LatentGenerator, load
from vlt.tools.predicting import default_precision, predict_trainer

GRID_IMAGES = 64  # the PNG shows the first images only; the npz holds all of them


def save_grid(images: np.ndarray, path: str | Path, labels: list[str], title: str, cols: int = 8) -> None:
    """(B, H, W, 3) uint8 -> a labelled PNG panel (`vlt.panels`), `cols` images per row, columns by class."""
    rows = [images[i : i + cols] for i in range(0, len(images), cols)]
    row_labels = [f"{i}-{min(i + cols, len(images)) - 1}" for i in range(0, len(images), cols)]
    # Column labels are the first row's classes; classes cycle, so with cols = #classes every row matches.
    save_png(panel(rows, row_labels=row_labels, col_labels=labels[:cols], title=title), path)


def sample(
    *,
    dit: str,
    tokenizer: str | None = None,
    k: list[int] | None = None,
    classes: list[int] | None = None,
    count: int = 16,
    batch_size: int = 64,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    out: str = "samples",
    budget: float | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str | None = None,
    schedule: str | None = None,
) -> list[Path]:
    """Sample `count` images per K and save an ADM npz + a PNG grid per K (or one set at a mean-K budget).

    Args:
        dit: a stage-2 or joint checkpoint, or a generator export folder (it decodes on its own).
        tokenizer: another tokenizer (checkpoint or export) to decode with, e.g. a fine-tuned one; it
            must carry the same global pattern.
        k: token counts to sample at (default: every K the DiT serves).
        classes: labels cycled over the global image index (default: 0, 1, 2, ... over the DiT's classes).
        count: images per K, in total over all processes (50000 for FID-50K).
        batch_size: images per generator call and per part file, on each device.
        steps: ODE steps (default: the generator's `flow.sample_steps`).
        cfg_scale: guidance weight w (1 = no guidance; default: the generator's `flow` scale for each K,
            `cfg_scales[K]` or `cfg_scale`).
        seed: the same seed gives the same images, on any number of processes.
        out: output folder (parts of an unfinished run are resumed from <out>/parts).
        budget: mean K over the `count` images, one K per image (instead of `k`); writes
            grid_budget<B>.png and samples_budget<B>.npz (arr_0, labels, ks).
        accelerator: Lightning's accelerator ("auto", "gpu", "cpu").
        devices: devices (= processes) per node, e.g. 8; more than one runs DDP.
        num_nodes: nodes (under Slurm: the job's --nodes; `make sample LAUNCH=slurm` sets both).
        precision: Lightning's precision, e.g. "bf16-mixed" (default: bf16-mixed on a GPU, 32-true on CPU).
        schedule: coarse-to-fine sampling, e.g. "4,8@0.3,16@0.5,32@0.7" (K from flow time t on; t = 0 is
            noise): the images of each K follow it capped at K (`vlt.objectives.schedule`); best with a
            DiT trained for splits (`flow.split_prob`).
    """
    _check_arguments(k, budget, schedule, count, batch_size)
    model = load(dit, part="generator")
    if tokenizer is not None:
        swap_tokenizer(model, tokenizer)
    labels = classes or list(range(model.dit.cfg.num_classes))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if budget is not None:
        y = torch.tensor([labels[i % len(labels)] for i in range(count)])
        return sample_at_budget(model, y, budget, steps=steps, cfg_scale=cfg_scale, seed=seed, root=root)
    settings = {"dit": str(dit), "tokenizer": tokenizer, "count": count, "batch_size": batch_size}
    settings |= {"seed": seed, "steps": steps, "cfg_scale": cfg_scale, "labels": labels, "schedule": schedule}
    run = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "precision": precision}
    return sample_on_devices(model, k or model.ks, settings, root, **run)


def _check_arguments(
    k: list[int] | None, budget: float | None, schedule: str | None, count: int, batch_size: int
) -> None:
    if budget is not None and k is not None:
        raise ValueError("pass either --k (every image at each K) or --budget (one K per image), not both")
    if schedule is not None and budget is not None:
        raise ValueError("--schedule samples at each --k; --budget (one K per image) does not take it")
    if count < 1 or batch_size < 1:
        raise ValueError(f"--count and --batch-size must be >= 1, got {count} and {batch_size}")


def sample_on_devices(
    model: LatentGenerator,
    ks: list[int],
    settings: dict,
    root: Path,
    *,
    accelerator: str,
    devices: int | str,
    num_nodes: int,
    precision: str | None,
) -> list[Path]:
    """Every missing batch of every K on Lightning's predict loop, then (rank zero) one npz + grid per K."""
    from vlt.data.sample_parts import SampleParts
    from vlt.lit.sampler import LitSampler, PartWriter, SampleData  # only `vlt sample` pays for Lightning

    unknown = sorted(set(ks) - set(model.ks))
    if unknown:
        raise ValueError(f"--k {unknown}: this generator serves K = {model.ks}")
    precision = precision or default_precision(accelerator)
    parts = SampleParts(root, {**settings, "precision": precision})
    parts.check_settings()
    writer = PartWriter(parts)
    trainer = predict_trainer(
        "sample",
        [writer],
        root,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
    )
    keys = ("labels", "seed", "steps", "cfg_scale", "schedule")
    lit = LitSampler(model, **{key: settings[key] for key in keys})
    data = SampleData(parts, ks, settings["count"], settings["batch_size"])
    trainer.predict(lit, datamodule=data, return_predictions=False)
    # Every rank's parts are on disk before rank zero reads them. Outside the loop: Lightning skips the
    # loop (and its hooks) on a rank whose batches were all made by an earlier run.
    trainer.strategy.barrier("vlt-sample-parts")
    if not trainer.is_global_zero:
        return []
    cols = min(len(settings["labels"]), 16)
    written = [path for k in ks for path in finish_k(parts, k, settings, root, cols)]
    console.summary(
        f"sample: {settings['count']} images at each K = {', '.join(map(str, ks))}, {precision}",
        where=root,
        files=[p.name for p in written],
        numbers={
            "processes": trainer.world_size,
            "batches made by rank 0 (others were done or on other ranks)": writer.written,
            "rank 0 images per second": writer.images_per_second,
        },
        next_steps=[f"vlt eval {written[1]} --ref REF.npz (the npz files are what FID evaluators read)"],
    )
    return written


def finish_k(parts, k: int, settings: dict, root: Path, cols: int) -> list[Path]:
    """Concatenate K's parts in global-index order into samples_k<K>.npz, and its grid PNG."""
    from vlt.data.sample_parts import save_adm_npz

    images, labels = parts.collect(k, settings["count"], settings["batch_size"])
    npz = save_adm_npz(root / f"samples_k{k}.npz", images, labels)
    shown = images[:GRID_IMAGES]
    names = [f"class {int(label)}" for label in labels[: len(shown)]]
    title = f"samples at K={k}, seed {settings['seed']} (rows: image index, columns: class)"
    save_grid(shown, root / f"grid_k{k}.png", names, title, cols=cols)
    return [root / f"grid_k{k}.png", npz]


def swap_tokenizer(model: LatentGenerator, path: str) -> None:
    """Decode with the tokenizer weights at `path`; its pattern must agree on every K the model serves."""
    model.take_tokenizer(load(path, part="tokenizer"), source=f"tokenizer {path}")


def sample_at_budget(
    model: LatentGenerator,
    y: torch.Tensor,
    budget: float,
    *,
    steps: int | None,
    cfg_scale: float | None,
    seed: int,
    root: Path,
) -> list[Path]:
    """One K per image at a mean-K budget: grid_budget<B>.png + samples_budget<B>.npz (arr_0, labels, ks)."""
    gen = torch.Generator().manual_seed(seed)
    images, ks = model.generate_adaptive(y, budget, cfg_scale=cfg_scale, steps=steps, generator=gen)
    images = to_uint8(images)
    tag = f"budget{budget:g}"
    grid, npz = root / f"grid_{tag}.png", root / f"samples_{tag}.npz"
    groups = [(k, images[(ks == k).numpy()][:16]) for k in ks.unique().tolist()]
    picture = panel(
        [g for _, g in groups],
        row_labels=[f"K={k} ({int((ks == k).sum())})" for k, _ in groups],
        title=f"samples at mean K {budget:g}, one K per image (rows: K, number of images)",
    )
    save_png(picture, grid)
    np.savez(npz, images, labels=y.numpy(), ks=ks.numpy())
    counts = {k: int((ks == k).sum()) for k in ks.unique().tolist()}
    console.summary(
        f"sample: {len(y)} images at mean K {budget:g} requested, {ks.double().mean().item():.2f} achieved",
        where=root,
        files=[grid.name, npz.name],
        numbers={"images per K": counts},
    )
    return [grid, npz]
