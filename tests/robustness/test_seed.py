"""The training stream is seedable: the same seed reads the same batches, another seed others."""

from __future__ import annotations

import pytest

from tests.robustness.conftest import write_shard
from vlt.data import WebDataModule


def batches(spec: str, seed: int | None, workers: int, n: int = 6) -> list[list[str]]:
    dm = WebDataModule(
        train=spec, image_size=16, batch_size=4, num_workers=workers, batches_per_epoch=n, shuffle_buffer=8,
        crop="random", seed=seed,
    )  # fmt: skip
    dm.setup()
    loader = dm.train_dataloader()
    # Two epochs of one loader, as Lightning iterates it: keys in order plus the augmented pixels.
    return [[*batch.key, float(batch.image.sum())] for _epoch in range(2) for batch in loader]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("seeded")
    for s in range(4):
        write_shard(root / f"train-{s}.tar", 6, start=6 * s)
    return str(root / "train-*.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches_other_seed_other_batches(spec, workers):
    first = batches(spec, 7, workers)
    assert first == batches(spec, 7, workers)
    assert first != batches(spec, 8, workers)


def test_default_seed_is_the_global_seed(spec, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what lightning's seed_everything(7) sets
    assert batches(spec, None, 0) == batches(spec, 7, 0)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert batches(spec, None, 0) == batches(spec, 0, 0)
