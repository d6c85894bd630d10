"""Pipeline stages between webdataset's sample dicts and vlt's batch dicts, with skip counting.

Letters: B batch, H, W image side, N latent slots, C latent channels.

Every per-sample step (the tar reader's verdict, image or latent bytes, label, metadata) runs inside
one skip-and-count path: a bad sample is skipped and counted by a `SkipTally` with its key and the
reason, never fatal. Problems of a whole shard (truncated, corrupt header, not a tar, no samples, a
failing `pipe:` command) are counted separately as shard errors, with the shard's name.
Worker processes cannot share counters with the main process, so the counts travel IN the batches:
each typed batch (`vlt.types.ImageBatch` / `LatentBatch`) carries `skips` (counts and the first few
notes) since the previous batch of its worker; a worker whose stream ends with counts that no batch
carried emits one `SkipsOnly` record, which the DataModule consumes in the main process, so counts
arrive even when no batch forms.

The training stream never ends (shards are resampled), so a tally built with `max_bad` raises
`StreamError`, naming the shards, after that many consecutive bad samples or shard errors, or after
`max_idle_s` seconds without a good sample: a stream in which nothing decodes fails, it never spins.

Content-adaptive K: `attach_ks` gives each latent record its K_i from an allocation (by key) and
`bucket_by_k` batches records of equal K only, so a batch is one DiT call at one length (no padding).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from vlt.data.seeds import worker_seed
from vlt.data.transforms import IMAGE_EXTENSIONS, Crop, image_array, to_unit_range
from vlt.types import Batch, ImageBatch, LatentBatch, SkipCounts, SkipsOnly

log = logging.getLogger(__name__)
MAX_KEYS = 8  # bad keys carried per batch: enough to find the culprits, bounded memory
MAX_SHARDS = 8  # shard names kept for a StreamError message
INT64 = (-(2**63), 2**63 - 1)
Record = dict[str, Any]


class StreamError(RuntimeError):
    """A training stream that yields nothing decodable (or nothing at all for too long)."""


class SampleError(ValueError):
    """One sample that cannot be used (bad bytes, label or metadata); skipped and counted."""


class SkipTally:
    """Per-process skip counts since the last emitted batch (copied into each worker), and a watchdog.

    Args:
        max_bad: raise StreamError after this many consecutive bad samples or shard errors
            (None: never; the finite validation stream ends on its own).
        max_idle_s: raise StreamError when no good sample came for this long (checked at each event).
    """

    def __init__(self, *, max_bad: int | None = None, max_idle_s: float | None = None) -> None:
        self.max_bad, self.max_idle_s = max_bad, max_idle_s
        self.count = self.shard_errors = 0
        self.keys: list[str] = []
        self.bad_in_a_row = 0
        self.bad_shards: list[str] = []
        self.last_good = time.monotonic()

    def add(self, key: str, reason: str) -> None:
        """Count one skipped sample."""
        self.count += 1
        self._note(f"{key}: {reason}")

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler for shard-level errors: count, warn with the shard, continue."""
        url = str(exn.args[-1]) if exn.args else "?"
        self.shard_errors += 1
        note = f"shard {url}: {type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        log.warning("%s", note)
        if url not in self.bad_shards and len(self.bad_shards) < MAX_SHARDS:
            self.bad_shards.append(url)
        self._note(note)
        return True

    def good(self) -> None:
        """A sample decoded: the watchdog starts over."""
        self.bad_in_a_row = 0
        self.last_good = time.monotonic()

    def _note(self, note: str) -> None:
        if len(self.keys) < MAX_KEYS:
            self.keys.append(note)
        self.bad_in_a_row += 1
        idle = time.monotonic() - self.last_good
        if self.max_bad is not None and self.bad_in_a_row >= self.max_bad:
            self._fail(f"{self.bad_in_a_row} bad samples or shards in a row")
        if self.max_idle_s is not None and idle > self.max_idle_s:
            self._fail(f"no sample decoded for {idle:.0f} s")

    def _fail(self, why: str) -> None:
        raise StreamError(
            f"the training stream yields nothing usable: {why}; shards with errors: {self.bad_shards}; "
            f"last problems: {self.keys}. Check the shard files (`tar tf <shard>`), a `pipe:` command "
            "by hand, or the data spec (data.init_args.train)"
        )

    def take(self) -> tuple[int, int, list[str]]:
        """Return and reset (skipped samples, shard errors, notes)."""
        out = (self.count, self.shard_errors, self.keys)
        self.count, self.shard_errors, self.keys = 0, 0, []
        return out

    def pending(self) -> bool:
        return bool(self.count or self.shard_errors)


def _member(sample: Record, names: tuple[str, ...]) -> bytes | None:
    for ext, value in sample.items():
        if not ext.startswith("__") and ext.lower() in names:
            return value
    return None


def _meta(sample: Record) -> dict:
    raw = _member(sample, ("json",))
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleError(f"json member is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise SampleError(f"json member is a {type(meta).__name__}, not an object")
    return meta


def as_int(value: Any, what: str, *, low: int = INT64[0]) -> int:
    """An integral, finite number (or its decimal text) in [low, int64 max]; SampleError otherwise."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace").strip()
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise SampleError(f"{what} {value[:40]!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SampleError(f"{what} {value!r} is not a number")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise SampleError(f"{what} {value!r} is not an integer")
    if not low <= int(value) <= INT64[1]:
        raise SampleError(f"{what} {int(value)} is out of range [{low}, 2**63)")
    return int(value)


def _label(sample: Record, meta: dict) -> int:
    """Label from .cls, else .txt (when it is an integer; captions are not labels), else json "label",
    else -1 (unlabelled). Labels below -1 are errors, not the unconditional label."""
    raw = _member(sample, ("cls",))
    if raw is not None:
        return as_int(raw, "label (.cls)", low=-1)
    raw = _member(sample, ("txt",))
    if raw is not None and raw.strip().lstrip(b"-").isdigit():
        return as_int(raw, "label (.txt)", low=-1)
    return as_int(meta["label"], "label (json)", low=-1) if "label" in meta else -1


def _check(sample: Record) -> str:
    key = str(sample.get("__key__", "?"))
    if "__error__" in sample:
        raise SampleError(sample["__error__"])
    return key


def decode_images(
    src: Iterator[Record], *, tally: SkipTally, size: int, crop: Crop, flip: bool, seed: int
) -> Iterator[Record]:
    """webdataset samples -> records {key, image (H, W, 3) uint8, label, complexity}; bad ones skipped."""
    rng = np.random.default_rng([seed, worker_seed()])
    for sample in src:
        key = str(sample.get("__key__", "?"))
        try:
            key = _check(sample)
            data = _member(sample, IMAGE_EXTENSIONS)
            if data is None:
                raise SampleError("no image member")
            meta = _meta(sample)
            record = {"key": key, "label": _label(sample, meta)}
            record["complexity"] = as_int(meta.get("complexity", -1), "complexity")
            record["image"] = image_array(data, size, crop=crop, flip=flip, rng=rng)  # (H, W, 3)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on bad bytes
            tally.add(key, str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}")
            continue
        tally.good()
        yield record


def _latent(data: bytes, shape: tuple[int, ...] | None) -> np.ndarray:
    latent = np.load(io.BytesIO(data), allow_pickle=False)
    if latent.ndim != 2 or latent.dtype.kind not in "fiu":
        raise SampleError(
            f"latent has shape {latent.shape} and dtype {latent.dtype}, expected (N, C) numbers"
        )
    if shape is not None and latent.shape != shape:
        raise SampleError(f"latent has shape {latent.shape}, the stream's others {shape}")
    if not np.isfinite(latent).all():
        raise SampleError("latent holds NaN or inf")
    return latent.astype(np.float32, copy=False)


def decode_latents(
    src: Iterator[Record], *, tally: SkipTally, flip: bool = False, seed: int = 0
) -> Iterator[Record]:
    """webdataset samples -> records {key, latent (N, C) float32, label, complexity, k}; bad ones skipped.

    flip: where a sample also holds `latent_flip.npy` (the latent of the horizontally flipped image),
    take it instead of `latent.npy` with probability 1/2 (a seeded draw per sample; the reference's
    stage-2 augmentation). Validation passes flip=False and always reads `latent.npy`.
    """
    shape: tuple[int, ...] | None = None
    rng = np.random.default_rng([seed, worker_seed()])
    for sample in src:
        key = str(sample.get("__key__", "?"))
        try:
            key = _check(sample)
            data = _member(sample, ("latent.npy",))
            if data is None:
                raise SampleError("no latent.npy member")
            flipped = _member(sample, ("latent_flip.npy",)) if flip else None
            if flipped is not None and rng.random() < 0.5:
                data = flipped
            meta = _meta(sample)
            record = {"key": key, "label": _label(sample, meta), "latent": _latent(data, shape)}  # (N, C)
            record["complexity"] = as_int(meta.get("complexity", -1), "complexity")
            record["k"] = as_int(meta.get("k", -1), "k", low=-1)
        except Exception as exc:
            tally.add(key, str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}")
            continue
        shape = record["latent"].shape
        tally.good()
        yield record


def _long(records: list[Record], name: str) -> torch.Tensor:
    return torch.tensor([int(r[name]) for r in records], dtype=torch.long)  # (B,)


def collate_images(records: list[Record]) -> ImageBatch:
    """Records -> ImageBatch(image (B, 3, H, W) in [-1, 1], label, complexity, key)."""
    image = to_unit_range(np.stack([r["image"] for r in records]))  # (B, 3, H, W)
    keys = [r["key"] for r in records]
    return ImageBatch(
        image=image, label=_long(records, "label"), complexity=_long(records, "complexity"), key=keys
    )


def collate_latents(records: list[Record]) -> LatentBatch:
    """Records -> LatentBatch(latent (B, N, C), label, complexity, k, key); one N per batch."""
    latent = torch.from_numpy(np.stack([r["latent"] for r in records]))  # (B, N, C)
    return LatentBatch(
        latent=latent, label=_long(records, "label"), complexity=_long(records, "complexity"),
        k=_long(records, "k"), key=[r["key"] for r in records],
    )  # fmt: skip


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
    collate: Callable[[list[Record]], Batch],
    bucket: Callable[[Record], Hashable] | None = None,
) -> Iterator[Batch | SkipsOnly]:
    """Group records into collated batches that carry the skip counts (see module doc).

    With `bucket`, one buffer per bucket value: a batch is emitted when its buffer fills, so every
    batch is homogeneous. At the end of the stream (partial=True) the partial buffers are flushed in
    sorted bucket order, so no record is lost; partial=False drops them (the infinite train stream).
    Counts left after the last batch leave in one skips-only record.
    Memory: at most G * (batch_size - 1) records wait in G buffers.
    """
    buffers: dict[Hashable, list[Record]] = {}
    for record in src:
        name = bucket(record) if bucket is not None else 0
        current = buffers.setdefault(name, [])
        current.append(record)
        if len(current) == batch_size:
            yield _with_counts(collate(buffers.pop(name)), tally)
    if partial:
        for name in sorted(buffers):
            yield _with_counts(collate(buffers[name]), tally)
    if tally.pending():
        yield SkipsOnly(SkipCounts(*tally.take()))


def _with_counts(batch: Batch, tally: SkipTally) -> Batch:
    batch.skips = SkipCounts(*tally.take())
    return batch


def record_k(record: Record) -> int:
    return int(record["k"])


def bucket_by_k(
    src: Iterator[Record],
    *,
    batch_size: int,
    partial: bool,
    tally: SkipTally,
    collate: Callable[[list[Record]], Batch],
) -> Iterator[Batch | SkipsOnly]:
    """`batch_records` with one buffer per K: equal-K batches, no padding (see `batch_records`)."""
    return batch_records(
        src, batch_size=batch_size, partial=partial, tally=tally, collate=collate, bucket=record_k
    )
