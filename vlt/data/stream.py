"""Pipeline stages between webdataset's sample dicts and vlt's batch dicts, with skip counting.

Letters: B batch, H, W image side, N latent slots, C latent channels.

Bad samples (undecodable bytes, no image or latent member, unreadable tar data) are skipped and
counted by a `SkipTally`. Worker processes cannot share counters with the main process, so the
tally's count travels IN the batches: each emitted batch carries `n_skipped` (samples skipped since
the previous batch of this worker) and `skipped_keys` (the first few of them, with the reason).
The batcher holds back one full batch until the next one is ready (or the stream ends), so skips
after a worker's last sample still ride on a batch; only a worker that emits no batch at all loses
its count (it still logs a warning).

Content-adaptive K: `attach_ks` gives each latent record its K_i from an allocation (by key) and
`bucket_by_k` batches records of equal K only, so a batch is one DiT call at one length (no padding).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import webdataset as wds

from vlt.data.transforms import IMAGE_EXTENSIONS, Crop, image_array, to_unit_range

log = logging.getLogger(__name__)
MAX_KEYS = 8  # bad keys carried per batch: enough to find the culprits, bounded memory
Record = dict[str, Any]


class SkipTally:
    """Per-process count of skipped samples since the last emitted batch (copied into each worker)."""

    def __init__(self) -> None:
        self.count = 0
        self.keys: list[str] = []

    def add(self, key: str, reason: str) -> None:
        self.count += 1
        if len(self.keys) < MAX_KEYS:
            self.keys.append(f"{key}: {reason}")

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler for tar-level errors: count one skip and continue."""
        self.add("<tar>", f"{type(exn).__name__}: {exn}")
        return True

    def take(self) -> tuple[int, list[str]]:
        """Return and reset (count, keys)."""
        out = (self.count, self.keys)
        self.count, self.keys = 0, []
        return out

    def flush_warning(self) -> None:
        """Log skips that no batch can carry (a worker that produced no sample at all)."""
        if self.count:
            n, keys = self.take()
            log.warning("%d samples skipped in a worker that produced no batch: %s", n, keys)


def _member(sample: Record, names: tuple[str, ...]) -> bytes | None:
    for ext, value in sample.items():
        if not ext.startswith("__") and ext.lower() in names:
            return value
    return None


def _meta(sample: Record) -> dict:
    raw = _member(sample, ("json",))
    try:
        meta = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _label(sample: Record, meta: dict) -> int:
    """Label from .cls, else .txt (an int), else json "label", else -1."""
    for names in (("cls",), ("txt",)):
        raw = _member(sample, names)
        if raw is not None:
            try:
                return int(raw.decode().strip())
            except ValueError:
                pass
    value = meta.get("label", -1)
    return int(value) if isinstance(value, (int, float)) else -1


def decode_images(
    src: Iterator[Record], *, tally: SkipTally, size: int, crop: Crop, flip: bool, seed: int
) -> Iterator[Record]:
    """webdataset samples -> records {key, image (H, W, 3) uint8, label, complexity}; bad ones skipped."""
    rng = np.random.default_rng([seed, wds.utils.pytorch_worker_seed()])
    for sample in src:
        key = str(sample.get("__key__", "?"))
        data = _member(sample, IMAGE_EXTENSIONS)
        if data is None:
            tally.add(key, "no image member")
            continue
        try:
            arr = image_array(data, size, crop=crop, flip=flip, rng=rng)  # (H, W, 3)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on bad bytes
            tally.add(key, f"{type(exc).__name__}: {exc}")
            continue
        meta = _meta(sample)
        yield {
            "key": key,
            "image": arr,
            "label": _label(sample, meta),
            "complexity": meta.get("complexity", -1),
        }


def decode_latents(src: Iterator[Record], *, tally: SkipTally) -> Iterator[Record]:
    """webdataset samples -> records {key, latent (N, C) float32, label, complexity, k}; bad ones skipped."""
    for sample in src:
        key = str(sample.get("__key__", "?"))
        data = _member(sample, ("latent.npy",))
        if data is None:
            tally.add(key, "no latent.npy member")
            continue
        try:
            latent = np.load(io.BytesIO(data), allow_pickle=False)
            if latent.ndim != 2:
                raise ValueError(f"latent has shape {latent.shape}, expected (N, C)")
        except Exception as exc:
            tally.add(key, f"{type(exc).__name__}: {exc}")
            continue
        meta = _meta(sample)
        yield {
            "key": key,
            "latent": latent.astype(np.float32, copy=False),  # (N, C)
            "label": _label(sample, meta),
            "complexity": meta.get("complexity", -1),
            "k": meta.get("k", -1),
        }


def collate_images(records: list[Record]) -> Record:
    """Records -> {"image": (B, 3, H, W) in [-1, 1], "label": (B,), "complexity": (B,), "key": [B]}."""
    return {
        "image": to_unit_range(np.stack([r["image"] for r in records])),  # (B, 3, H, W)
        "label": torch.tensor([r["label"] for r in records], dtype=torch.long),  # (B,)
        "complexity": torch.tensor([int(r["complexity"]) for r in records], dtype=torch.long),  # (B,)
        "key": [r["key"] for r in records],
    }


def collate_latents(records: list[Record]) -> Record:
    """Records -> {"latent": (B, N, C), "label", "complexity", "k": (B,) long, "key"}; one N per batch."""
    return {
        "latent": torch.from_numpy(np.stack([r["latent"] for r in records])),  # (B, N, C)
        "label": torch.tensor([r["label"] for r in records], dtype=torch.long),  # (B,)
        "complexity": torch.tensor([int(r["complexity"]) for r in records], dtype=torch.long),  # (B,)
        "k": torch.tensor([int(r["k"]) for r in records], dtype=torch.long),  # (B,)
        "key": [r["key"] for r in records],
    }


def attach_ks(src: Iterator[Record], *, ks: Mapping[str, int], tally: SkipTally) -> Iterator[Record]:
    """Set record["k"] = K_i looked up by key; a key the allocation lacks is skipped and counted.

    Keys, not positions: shard order and worker splits change between runs.
    """
    for record in src:
        k = ks.get(record["key"])
        if k is None:
            tally.add(record["key"], "no K_i in the allocation: rerun `vlt allocate` for this cache")
            continue
        record["k"] = int(k)
        yield record


def batch_records(
    src: Iterator[Record],
    *,
    batch_size: int,
    partial: bool,
    tally: SkipTally,
    collate: Callable[[list[Record]], Record],
    bucket: Callable[[Record], Hashable] | None = None,
) -> Iterator[Record]:
    """Group records into collated batches that carry `n_skipped` and `skipped_keys` (see module doc).

    With `bucket`, one buffer per bucket value: a batch is emitted when its buffer fills, so every
    batch is homogeneous. At the end of the stream (partial=True) the partial buffers are flushed in
    sorted bucket order, so no record is lost; partial=False drops them (the infinite train stream).
    Memory: at most G * (batch_size - 1) records wait in G buffers, plus the one batch held back.
    """

    def emit(records: list[Record]) -> Record:
        batch = collate(records)
        batch["n_skipped"], batch["skipped_keys"] = tally.take()
        return batch

    buffers: dict[Hashable, list[Record]] = {}
    held: list[Record] | None = None
    for record in src:
        name = bucket(record) if bucket is not None else 0
        current = buffers.setdefault(name, [])
        current.append(record)
        if len(current) == batch_size:
            if held is not None:
                yield emit(held)
            held = buffers.pop(name)
    ready = [held] if held is not None else []
    if partial:
        ready += [buffers[name] for name in sorted(buffers)]
    for records in ready:
        yield emit(records)
    tally.flush_warning()


def record_k(record: Record) -> int:
    return int(record["k"])


def bucket_by_k(
    src: Iterator[Record],
    *,
    batch_size: int,
    partial: bool,
    tally: SkipTally,
    collate: Callable[[list[Record]], Record],
) -> Iterator[Record]:
    """`batch_records` with one buffer per K: equal-K batches, no padding (see `batch_records`)."""
    return batch_records(
        src, batch_size=batch_size, partial=partial, tally=tally, collate=collate, bucket=record_k
    )
