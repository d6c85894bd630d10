"""Do the generation metrics tell sets apart? Known degradations of real val images: metrics side by side.

    .venv/bin/python bench/metrics_sanity.py [--features data/features] [--tokenizer runs/tokenizer-tiny/...]

Real images: the synthetic val recipe (`vlt data synthetic`, seed 0, split val). Images 0..511 (the val
shards) are the reference, as in the training callbacks; a disjoint pool (images 1024..) is what each
seed draws its evaluated set from. Families of degradation, 5 levels each: Gaussian blur, additive
Gaussian noise, a colour cast (red up, blue down), shapes removed, shapes displaced (all to the right,
cut at the border), and reconstructions of the tokenizer at K = 32..4 (4 levels: its grid). Each one
changes the distribution of images, not just each image: a rotation of hue or a shift in a random
direction would leave this recipe's distribution (uniform hues, uniform positions) about where it was,
so no distance between distributions could rank them. For every metric it prints:
  * cv: seed-to-seed coefficient of variation (std / |mean| over --seeds draws of images and noise) at
    256 and 512 samples, the median and the largest over all degraded sets;
  * monotone: whether the mean over seeds ranks the levels of each family in order (distances
    rising, precision / recall / class accuracy falling);
  * real vs real: two disjoint halves of the real set (images 0..511 and 512..1023) scored against
    each other, with a bootstrap interval resampling both halves: 0 should lie inside it.
`fd_proxy` is the random-conv Fréchet distance the callbacks log as rfid_proxy / gfid_proxy. The last
line sums up fd_vltnet at 512 samples: `metrics_sanity: cv=<largest cv> monotone=<yes|no>
real_vs_real=<within|outside>`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlt.data import synthetic as synthetic_lib  # noqa: E402
from vlt.metrics.features import load_vltnet  # noqa: E402
from vlt.metrics.fid import ProxyExtractor  # noqa: E402
from vlt.metrics.scores import FeatureSet, frechet, score  # noqa: E402

LEVELS = {
    "blur": [0.5, 0.75, 1.0, 1.5, 2.0],  # Gaussian sigma, pixels
    "noise": [0.02, 0.04, 0.08, 0.16, 0.32],  # std in [-1, 1] units
    "colour": [0.02, 0.04, 0.08, 0.16, 0.32],  # cast: red + level, blue - level ([-1, 1] units)
    "removed": [0.1, 0.2, 0.4, 0.6, 0.8],  # share of shapes left out
    "displaced": [1, 2, 4, 8, 16],  # shift of every shape to the right, pixels of the 2x canvas
}
DISTANCES = ("fd_vltnet", "kid_vltnet", "fd_proxy")


def render(i: int, drop: float = 0.0, shift: int = 0, seed: int = 0) -> tuple[np.ndarray, int]:
    """Val image i of the synthetic recipe, optionally with shapes left out (seeded per image) or moved
    `shift` pixels to the right (the part pushed past the border is cut)."""
    rng = np.random.default_rng([0, 1, i])  # the val split's generator (`vlt data synthetic`)
    edit = np.random.default_rng([seed, 99, i])
    side, size = 64, 32
    canvas, label = synthetic_lib._background(rng, side)
    n = int(rng.integers(0, 11))
    kinds = [synthetic_lib.SHAPES[j] for j in rng.integers(0, len(synthetic_lib.SHAPES), size=n)]
    for kind in kinds:
        mask = synthetic_lib._shape_mask(rng, kind, side)
        colour = synthetic_lib._random_colour(rng)
        if edit.random() < drop:
            continue
        if shift:
            mask = np.roll(mask, shift, axis=1)
            mask[:, :shift] = False  # what rolled round the right border is cut, not wrapped
        canvas[mask] = colour
    small = canvas.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.clip(np.round(small * 255), 0, 255).astype(np.uint8), label


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1)[:, None]  # (3, 1, L)
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel[..., None, :], groups=3)
    return F.conv2d(x, kernel[..., :, None], groups=3)


def colour_cast(x: torch.Tensor, level: float) -> torch.Tensor:
    """A warm cast: red up and blue down by `level` ([-1, 1] units), every image the same way."""
    return (x + level * torch.tensor([1.0, 0.0, -1.0])[:, None, None]).clamp(-1, 1)


def degraded(family: str, level: float, index: np.ndarray, seed: int, pool: torch.Tensor) -> torch.Tensor:
    if family in ("removed", "displaced"):
        kw = {"drop": level} if family == "removed" else {"shift": int(level)}
        return to_tensor(np.stack([render(int(i), seed=seed, **kw)[0] for i in index]))
    x = pool[index - 1024]
    if family == "blur":
        return blur(x, level)
    if family == "noise":
        g = torch.Generator().manual_seed(seed)
        return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return colour_cast(x, level)


class Extractors:
    """vltnet (features + hue logits) and the random proxy on batches of images."""

    def __init__(self, features: str) -> None:
        self.vltnet, self.proxy = load_vltnet(features), ProxyExtractor()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = {"vlt": [], "logits": [], "proxy": []}
        for batch in x.split(256):
            e = self.vltnet.embed(batch)
            parts["vlt"].append((e - self.vltnet.shift) / self.vltnet.scale)
            parts["logits"].append(self.vltnet.head["hue"](e))
            parts["proxy"].append(self.proxy(batch))
        return {k: torch.cat(v).double() for k, v in parts.items()}


def scores(real: dict, fake: dict, labels: torch.Tensor, n: int) -> dict[str, float]:
    out = score(
        FeatureSet(real["vlt"]), FeatureSet(fake["vlt"][:n], fake["logits"][:n], labels[:n]),
        ["fd", "kid", "precision", "recall", "class_acc"], replicates=0, subset_std=False,
    )  # fmt: skip
    values = {f"{name}_vltnet": e.mean for name, e in out.items() if name != "kid_subset_std"}
    values["fd_proxy"] = frechet(real["proxy"], fake["proxy"][:n])
    return values


def reconstructions(tokenizer: str | None):
    if not tokenizer or not Path(tokenizer).is_file():
        print(f"(no tokenizer at {tokenizer}: reconstruction family skipped)")
        return None
    from vlt.lit import LitTokenizer

    model = LitTokenizer.load_from_checkpoint(tokenizer, map_location="cpu").eval()

    @torch.no_grad()
    def recon(x: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cat([model.budget_reconstruct(b, k).float().clamp(-1, 1) for b in x.split(256)])

    return recon


def measure(args, extract, real, pool, labels_pool, recon) -> dict[tuple[str, float], list[dict]]:
    families = {**LEVELS, **({"recon": [32, 16, 8, 4]} if recon else {})}
    results: dict[tuple[str, float], list[dict]] = {}
    for seed in range(args.seeds):
        index = np.random.default_rng([seed, 5]).choice(np.arange(1024, 1024 + len(pool)), 512, replace=False)
        labels = labels_pool[index - 1024]
        for family, levels in families.items():
            for level in levels:
                x = recon(pool[index - 1024], int(level)) if family == "recon" else None
                x = degraded(family, level, index, seed, pool) if x is None else x
                feats = extract(x)
                entry = {n: scores(real, feats, labels, n) for n in (256, 512)}
                results.setdefault((family, level), []).append(entry)
        print(f"seed {seed} done ({time.perf_counter() - args.start:.0f} s)", flush=True)
    return results


def summarise(results, metrics: list[str]) -> dict[str, dict]:
    summary = {}
    by_family: dict[str, list] = {}
    for (family, level), entries in results.items():
        by_family.setdefault(family, []).append((level, entries))
    for metric in metrics:
        cv = {n: [] for n in (256, 512)}
        monotone = {}
        for family, items in by_family.items():
            means = []
            for _, entries in items:  # levels in increasing severity (recon: K falling)
                for n in (256, 512):
                    v = np.array([e[n][metric] for e in entries])
                    cv[n].append(v.std(ddof=1) / max(abs(v.mean()), 1e-12))
                means.append(np.mean([e[512][metric] for e in entries]))
            steps = np.diff(means) * (1 if metric in DISTANCES else -1)
            monotone[family] = bool((steps > 0).all())
        summary[metric] = {"cv": cv, "monotone": monotone}
    return summary


def real_vs_real(extract, pool_real: torch.Tensor) -> dict[str, object]:
    a, b = extract(pool_real[:512]), extract(pool_real[512:1024])
    out = score(
        FeatureSet(a["vlt"]), FeatureSet(b["vlt"]), ["fd", "kid", "precision", "recall"], resample_real=True
    )
    values = {f"{k}_vltnet": v for k, v in out.items() if k != "kid_subset_std"}

    def fd(ri, fi):
        return {"fd": frechet(a["proxy"][ri], b["proxy"][fi])}

    from vlt.metrics.intervals import bootstrap

    values["fd_proxy"] = bootstrap(fd, 512, 512, replicates=200, resample_real=True)["fd"]
    return values


def print_levels(results, metrics: list[str]) -> None:
    print("\nmean over seeds at 512 samples, per level (fd_vltnet: mean ± seed-to-seed std, its cv):")
    for (family, level), entries in results.items():
        means = ", ".join(
            f"{m} {np.mean([e[512][m] for e in entries]):.4g}" for m in metrics if m != "fd_vltnet"
        )
        fd = np.array([e[512]["fd_vltnet"] for e in entries])
        print(f"  {family} {level:g}: fd_vltnet {fd.mean():.4g} ± {fd.std(ddof=1):.2g} "
              f"(cv {fd.std(ddof=1) / fd.mean():.1%}), {means}")  # fmt: skip


def report(summary: dict, rvr: dict, families: list[str]) -> None:
    print("\n| metric | cv@256 median / max | cv@512 median / max | monotone (" + ", ".join(families) + ") "
          "| real vs real (512 + 512) | 0 inside |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for metric, s in summary.items():
        cv = {n: (np.median(v), np.max(v)) for n, v in s["cv"].items()}
        mono = ", ".join("yes" if s["monotone"][f] else "no" for f in families)
        e = rvr.get(metric)
        within = "-" if e is None or metric not in DISTANCES else ("yes" if e.covers(0.0) else "no")
        print(
            f"| {metric} | {cv[256][0]:.1%} / {cv[256][1]:.1%} | {cv[512][0]:.1%} / {cv[512][1]:.1%} "
            f"| {mono} | {'-' if e is None else format(e, '.4g')} | {within} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", default="data/features", help="vltnet file or folder (`vlt features`)")
    parser.add_argument("--tokenizer", default="runs/tokenizer-tiny/checkpoints/last.ckpt")
    parser.add_argument("--seeds", type=int, default=10, help="draws of images and noise per degraded set")
    parser.add_argument("--pool", type=int, default=2048, help="val-recipe images the draws come from")
    args = parser.parse_args()
    args.start = time.perf_counter()
    torch.set_grad_enabled(False)
    extract = Extractors(args.features)
    rendered = [render(i) for i in range(1024 + args.pool)]
    images = to_tensor(np.stack([p for p, _ in rendered]))
    labels = torch.tensor([label for _, label in rendered])
    real = extract(images[:512])
    recon = reconstructions(args.tokenizer)
    results = measure(args, extract, real, images[1024:], labels[1024:], recon)
    metrics = list(next(iter(results.values()))[0][512])
    summary = summarise(results, metrics)
    rvr = real_vs_real(extract, images[:1024])
    families = list(dict.fromkeys(f for f, _ in results))
    print_levels(results, metrics)
    report(summary, rvr, families)
    s = summary["fd_vltnet"]
    cv = float(np.max(s["cv"][512]))
    floor = 10 * abs(rvr["fd_vltnet"].mean)
    fds = [np.array([e[512]["fd_vltnet"] for e in entries]) for entries in results.values()]
    above = [v.std(ddof=1) / v.mean() for v in fds if v.mean() >= floor]
    print(f"\nfd_vltnet cv@512 over the {len(above)} sets at >= 10x the real-vs-real distance ({floor:.3g}): "
          f"max {max(above, default=float('nan')):.1%}")  # fmt: skip
    monotone = "yes" if all(s["monotone"].values()) else "no"
    within = "within" if rvr["fd_vltnet"].covers(0.0) else "outside"
    print(f"\nwall time {time.perf_counter() - args.start:.0f} s")
    print(f"metrics_sanity: cv={cv:.4f} monotone={monotone} real_vs_real={within}")


if __name__ == "__main__":
    main()
