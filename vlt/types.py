"""Typed batches shared by every stage: what the DataModule yields and the systems and tools read.

Letters: B batch, H/W height/width, N slots, C channels.

A batch also carries the skip counts its readers collected since the previous batch (`skips`); the
DataModule pops them in the main process (and a stream whose last samples all failed ends with a
`SkipsOnly` record that carries nothing else). Lightning moves dataclass batches between devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class SkipCounts:
    """Samples skipped and shard errors since the previous batch, with the first few notes."""

    skipped: int = 0
    shard_errors: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class ImageBatch:
    image: Tensor  # (B, 3, H, W) float in [-1, 1]
    label: Tensor  # (B,) long; -1 = unlabelled
    complexity: Tensor  # (B,) long; the builder's complexity label (-1 unknown)
    key: list[str]  # (B,) sample keys
    skips: SkipCounts | None = None

    def __len__(self) -> int:
        return len(self.key)


@dataclass
class LatentBatch:
    latent: Tensor  # (B, N, C) float32 full slot latents from the cache
    label: Tensor  # (B,) long; -1 = unlabelled
    complexity: Tensor  # (B,) long
    k: Tensor  # (B,) long; the allocated K_i (content-adaptive), -1 when none
    key: list[str]  # (B,) sample keys
    skips: SkipCounts | None = None

    def __len__(self) -> int:
        return len(self.key)


@dataclass
class SkipsOnly:
    """The end of a stream whose last counts no batch carried."""

    skips: SkipCounts

    def __len__(self) -> int:
        return 0


Batch = ImageBatch | LatentBatch
