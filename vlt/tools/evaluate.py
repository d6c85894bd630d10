"""`vlt eval SAMPLES --ref REF`: FID, sFID, IS, precision/recall and KID of generated samples.

    vlt eval samples/samples_k32.npz --ref VIRTUAL_imagenet256_labeled.npz   # Inception: ADM's protocol
    vlt eval samples/samples_k32.npz --ref 'data/synthetic/shards/val-*.tar' --features vltnet   # offline

SAMPLES and REF are each an npz (ADM layout), an image folder or webdataset shards
(`vlt.tools.image_sets`). The metrics follow the ADM evaluation suite (`vlt.metrics.generation`);
with `--features vltnet|proxy` the names carry the extractor (`fd_vltnet`, never FID) and sFID/IS are
reported unavailable. The extractor and its weights are checked before any image is read. Prints a
table (value and the 95% bootstrap half-width where one is computed) and writes a JSON file;
`--save-ref FILE` writes REF's statistics as a reusable reference batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlt import console
from vlt.metrics.eval_features import FeatureKind, build_extractor
from vlt.metrics.generation import Features, Moments, Reference, Result, evaluate
from vlt.tools.image_sets import FEATURES_KEY, ImageSet, open_set


def evaluate_samples(
    samples: str,
    ref: str,
    *,
    features: FeatureKind = "inception",
    weights: str | None = None,
    batch_size: int = 100,
    out: str = "eval.json",
    replicates: int = 200,
    seed: int = 0,
    device: str = "auto",
    save_ref: str | None = None,
) -> dict:
    """Score SAMPLES against REF with the ADM protocol; print a table, write `out` (JSON), return it.

    Args:
        samples: the generated images: an .npz (arr_0 uint8 NHWC), an image folder, or shards.
        ref: the reference images (same kinds), or an ADM reference batch with mu/sigma/mu_s/sigma_s.
        features: inception (FID and friends; needs torch-fidelity and the weights file), vltnet
            (the project's trained feature net, offline) or proxy (a fixed random conv net).
        weights: Inception weights file (default: the torch hub cache), or the vltnet file/folder
            (default: data/features).
        batch_size: images per extractor call.
        out: the JSON file of results.
        replicates: bootstrap replicates of the intervals (0: point values only). Above 5000 images
            per side KID and precision/recall are point values (their bootstrap is O(N M) memory).
        seed: bootstrap and KID subset seed.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        save_ref: write REF's statistics (and the extractor's name) to this .npz, for later `--ref`.
    """
    extractor = build_extractor(features, weights)  # first: a missing weights file fails before any read
    sample_set, ref_set = open_set(samples, "SAMPLES"), open_set(ref, "REF")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    extractor = extractor.to(dev)
    fake = extract(extractor, sample_set, batch_size, dev)
    reference = load_reference(ref_set, extractor, batch_size, dev)
    results = evaluate(fake, reference, kind=extractor.kind, replicates=replicates, seed=seed)
    report = {
        "samples": samples,
        "ref": ref,
        "features": extractor.name,
        "n_samples": len(fake.pool),
        "n_ref": None if reference.features is None else len(reference.features.pool),
        "ref_statistics": "precomputed" if reference.precomputed else "from images",
        "metrics": {name: _as_json(r) for name, r in results.items()},
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    if save_ref is not None:
        save_reference(save_ref, reference, extractor.name)
    if not console.quiet():
        print(table(results, report), flush=True)
    console.summary(f"eval: {samples} vs {ref}", files=[out, *([save_ref] if save_ref else [])])
    return report


@torch.no_grad()
def extract(extractor: nn.Module, images: ImageSet, batch_size: int, device: torch.device) -> Features:
    """Features of every image of the set, on the CPU (float64)."""
    hint = images.size_hint()
    total = None if hint is None else math.ceil(hint / batch_size)
    parts: list[Features] = []
    for batch in console.progress(images.batches(batch_size), total=total, desc=f"features {images.path}"):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W) uint8
        parts.append(Features(*(None if f is None else f.double().cpu() for f in extractor(x))))
    if not parts:
        raise ValueError(f"{images.path} holds no images")
    return Features(*(None if f[0] is None else torch.cat(f) for f in zip(*parts)))


def load_reference(ref: ImageSet, extractor: nn.Module, batch_size: int, device: torch.device) -> Reference:
    """REF's features, and its precomputed statistics instead of their moments where they fit."""
    usable = bool(ref.stats) and ref.stats_features == extractor.name
    if ref.stats and not usable:
        problem = f"{ref.path} holds statistics of {ref.stats_features!r}, not of {extractor.name!r}"
        if not ref.has_images:
            raise ValueError(f"{problem}, and no images to compute them from: use the matching --features")
        print(f"vlt eval: {problem}; computing them from its images", flush=True)
    features = extract(extractor, ref, batch_size, device) if ref.has_images else None
    if not usable:
        return Reference.of(features)
    stats = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in ref.stats.items()}
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"{ref.path} holds {sorted(stats)}: FID needs both mu and sigma")
    spatial = Moments(stats["mu_s"], stats["sigma_s"]) if {"mu_s", "sigma_s"} <= set(stats) else None
    if spatial is None and features is not None and features.spatial is not None:
        spatial = Moments.of(features.spatial)
    return Reference(features, Moments(stats["mu"], stats["sigma"]), spatial, precomputed=True)


def save_reference(path: str, reference: Reference, extractor_name: str) -> None:
    """mu, sigma (and mu_s, sigma_s) of the reference in ADM's keys, plus the extractor's name."""
    arrays = {"mu": reference.pool.mu.numpy(), "sigma": reference.pool.sigma.numpy()}
    if reference.spatial is not None:
        arrays |= {"mu_s": reference.spatial.mu.numpy(), "sigma_s": reference.spatial.sigma.numpy()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays, **{FEATURES_KEY: np.array(extractor_name)})


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _as_json(result: Result) -> dict:
    return {
        "value": _finite(result.value),
        "ci95": _finite(result.half),
        "method": result.method,
        "note": result.note,
    }


def table(results: dict[str, Result], report: dict) -> str:
    """metric | value | ± 95% | note, one line per metric."""
    head = f"vlt eval: {report['n_samples']} samples vs {report['n_ref'] or 'statistics of'} {report['ref']}"
    lines = [head, f"features: {report['features']}, reference statistics {report['ref_statistics']}"]
    lines.append(f"{'metric':<18} {'value':>12} {'± 95%':>10}  note")
    for name, r in results.items():
        value = "unavailable" if r.value is None else f"{r.value:.6g}"
        half = f"{r.half:.3g}" if _finite(r.half) is not None else "-"
        note = r.note or ("bootstrap over samples" if r.method == "bootstrap" else "")
        lines.append(f"{name:<18} {value:>12} {half:>10}  {note}")
    return "\n".join(lines)
