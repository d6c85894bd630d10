"""`vlt sample`: class-conditional images from a stage-2/3 checkpoint or generator export, at one or more K.

Writes, per K, a PNG grid and an `.npz` whose `arr_0` is uint8 (B, H, W, 3): the layout external
FID evaluators (the ADM suite, torch-fidelity) read. With `--budget MEAN_K` (content-adaptive K) each
image gets its own K, drawn from the DiT's p(K | class) tilted to that mean; the npz also holds `ks`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlt import console
from vlt.data.transforms import to_uint8
from vlt.panels import panel, save_png
from vlt.stages import LatentGenerator, load


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
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    out: str = "samples",
    budget: float | None = None,
) -> list[Path]:
    """Sample `count` images per K and save a PNG grid + an npz per K (or one set at a mean-K budget).

    Args:
        dit: a stage-2 or joint checkpoint, or a generator export folder (it decodes on its own).
        tokenizer: another tokenizer (checkpoint or export) to decode with, e.g. a fine-tuned one; it
            must carry the same global pattern.
        k: token counts to sample at (default: every K the DiT serves).
        classes: labels cycled over the samples (default: 0, 1, 2, ... over the DiT's classes).
        count: images per K.
        steps: ODE steps (default: the generator's `flow.sample_steps`).
        cfg_scale: guidance weight w (1 = no guidance; default: the generator's `flow` scale for each K,
            `cfg_scales[K]` or `cfg_scale`).
        seed: the same seed gives the same images.
        out: output folder.
        budget: mean K over the `count` images, one K per image (instead of `k`); writes
            grid_budget<B>.png and samples_budget<B>.npz (arr_0, labels, ks).
    """
    if budget is not None and k is not None:
        raise ValueError("pass either --k (every image at each K) or --budget (one K per image), not both")
    model = load(dit, part="generator")
    if tokenizer is not None:
        swap_tokenizer(model, tokenizer)
    ks = k or model.ks
    labels = classes or list(range(model.dit.cfg.num_classes))
    y = torch.tensor([labels[i % len(labels)] for i in range(count)])
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if budget is not None:
        return sample_at_budget(model, y, budget, steps=steps, cfg_scale=cfg_scale, seed=seed, root=root)
    written = []
    names = [f"class {int(label)}" for label in y]
    cols = min(len(labels), 16)
    for kk in console.progress(ks, desc="sample K"):
        gen = torch.Generator().manual_seed(seed)
        images = to_uint8(model.generate(y, kk, cfg_scale=cfg_scale, steps=steps, generator=gen))
        title = f"samples at K={kk}, seed {seed} (rows: image index, columns: class)"
        save_grid(images, root / f"grid_k{kk}.png", names, title, cols=cols)
        np.savez(root / f"samples_k{kk}.npz", images, labels=y.numpy())
        written += [root / f"grid_k{kk}.png", root / f"samples_k{kk}.npz"]
    console.summary(
        f"sample: {count} images at each K = {', '.join(map(str, ks))}",
        where=root,
        files=[p.name for p in written],
        next_steps=["open the grid_k*.png files; the npz files are what FID evaluators read"],
    )
    return written


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
