"""On-disk form of a per-image K allocation, stored beside a latent cache.

    <cache>/allocation.json   rule, cost, budget, lambda / tau, grid, p(K | class), achieved mean K, ...
    <cache>/k-<split>.npz     keys (S,) str and k (S,) int64: the K_i of every cached sample

`vlt allocate` writes them; `WebDataModule(allocation=...)` attaches K_i to each latent sample by key and
`LitDiT` reads p(K | class) for sampling. Keys, not positions: shard order and worker splits change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ALLOCATION = "allocation.json"


def save_allocation(
    root: str | Path, meta: dict[str, Any], ks: dict[str, tuple[list[str], np.ndarray]]
) -> Path:
    """Write allocation.json (meta) and one k-<split>.npz per split ({split: (keys, ks)})."""
    root = Path(root)
    for split, (keys, k) in ks.items():
        if len(keys) != len(k):
            raise ValueError(f"split {split}: {len(keys)} keys but {len(k)} K values")
        np.savez(root / f"k-{split}.npz", keys=np.asarray(keys, dtype=str), k=np.asarray(k, dtype=np.int64))
    path = root / ALLOCATION
    path.write_text(json.dumps(meta, indent=2))
    return path


def load_allocation(path: str | Path) -> dict[str, Any]:
    """allocation.json as a dict; a clear error naming the command when it is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / ALLOCATION
    if not path.exists():
        raise FileNotFoundError(
            f"no allocation at {path}: run `vlt allocate --cache {path.parent} --budget MEAN_K` first"
        )
    return json.loads(path.read_text())


def load_ks(path: str | Path, split: str) -> dict[str, int]:
    """{key: K_i} of one split from the k-<split>.npz beside allocation.json."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    file = root / f"k-{split}.npz"
    if not file.exists():
        raise FileNotFoundError(f"no per-image K for split {split!r} at {file}: rerun `vlt allocate`")
    with np.load(file) as data:
        return dict(zip(data["keys"].tolist(), data["k"].tolist(), strict=True))
