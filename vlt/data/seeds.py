"""Seeds of the training stream: one run seed, mixed with the rank, the loader worker and the epoch.

Shard resampling (`wds.ResampledShards(deterministic=True)`), the sample shuffle buffer and the
augmentations all derive from `rank_seed(seed, rank)` plus the worker id (and the epoch where a stage
restarts each epoch), so two ranks or two workers never draw the same sequence and a rerun with the
same seed, ranks and workers reads exactly the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds


def mix(*values: int) -> int:
    """A 31-bit seed from integers (numpy's SeedSequence: no collisions between small tuples)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0] >> 1)


def rank_seed(seed: int, rank: int) -> int:
    """One seed per (run seed, rank)."""
    return mix(seed, rank)


def worker_seed(base: int = 0) -> int:
    """`base` plus this loader worker's id (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return base + (info.id if info is not None else 0)


class SeededShuffle:
    """webdataset's shuffle buffer with a generator from (seed, worker, epoch) instead of the clock."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize, self.seed = bufsize, seed
        self.epoch = -1

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        self.epoch += 1
        rng = random.Random(mix(self.seed, worker_seed(), self.epoch))
        yield from wds.shuffle(self.bufsize, rng=rng)(src)
