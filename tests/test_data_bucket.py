"""K-bucketed latent batches: equal K per batch, no sample lost, exact epochs, skips counted."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from vlt.data import WebDataModule
from vlt.data.cache import LatentCache
from vlt.data.stream import SkipTally, attach_ks, bucket_by_k, collate_latents

GRID = [4, 8, 16, 32]


def records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "key": f"s{i:04d}",
            "latent": np.full((8, 2), i, dtype=np.float32),
            "label": i % 3,
            "complexity": -1,
            "k": int(rng.choice(GRID)),
        }
        for i in range(n)
    ]


def test_buckets_are_equal_k_and_keep_every_record():
    recs = records(103)
    batches = list(
        bucket_by_k(iter(recs), batch_size=5, partial=True, tally=SkipTally(), collate=collate_latents)
    )
    assert all(len(set(b.k.tolist())) == 1 for b in batches)
    assert Counter(k for b in batches for k in b.key) == Counter(r["key"] for r in recs)
    for b in batches:  # each record keeps its own K and latent
        assert all(recs[int(key[1:])]["k"] == k for key, k in zip(b.key, b.k.tolist(), strict=True))
        assert torch.equal(b.latent[:, 0, 0], torch.tensor([float(key[1:]) for key in b.key]))
    partial = Counter(int(b.k[0]) for b in batches if len(b.key) < 5)
    assert all(n == 1 for n in partial.values()), "at most one partial batch per K"


def test_train_buckets_drop_partials_and_bound_memory():
    recs = records(200, seed=1)
    consumed = []

    def source():
        for r in recs:
            consumed.append(r["key"])
            yield r

    emitted = 0
    stream = bucket_by_k(source(), batch_size=6, partial=False, tally=SkipTally(), collate=collate_latents)
    for batch in stream:
        assert batch.latent.shape == (6, 8, 2) and len(set(batch.k.tolist())) == 1
        emitted += 6
        # Buffers hold < batch_size records per K, plus one full batch held back for skip counts.
        assert len(consumed) - emitted <= len(GRID) * 5 + 6
    # Only full buckets are emitted: the infinite train stream never needs the partial ones.
    assert emitted == sum(6 * (n // 6) for n in Counter(r["k"] for r in recs).values())


def test_missing_keys_are_skipped_and_counted():
    recs = records(40, seed=2)
    ks = {r["key"]: r["k"] for r in recs if int(r["key"][1:]) % 7}  # drop every 7th key
    tally = SkipTally()
    stream = attach_ks(iter(recs), ks=ks, tally=tally)
    batches = list(bucket_by_k(stream, batch_size=4, partial=True, tally=tally, collate=collate_latents))
    assert sum(b.skips.skipped for b in batches) == 40 - len(ks)
    assert any("vlt allocate" in note for b in batches for note in b.skips.notes)
    assert sorted(k for b in batches for k in b.key) == sorted(ks)


def write_latents(root, split: str, n: int, shard: int) -> list[str]:
    keys = []
    for s in range(0, n, shard):
        with wds.TarWriter(str(root / f"{split}-{s // shard:06d}.tar")) as sink:
            for i in range(s, min(s + shard, n)):
                buf = io.BytesIO()
                np.save(buf, np.full((8, 2), i, dtype=np.float16))
                key = f"{split}{i:04d}"
                keys.append(key)
                sink.write({"__key__": key, "latent.npy": buf.getvalue(), "cls": str(i % 3).encode()})
    return keys


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """40 train / 23 val latent samples in shards of 5, K_i from {4, 8, 16, 32}; 2 val keys unallocated."""
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    train, val = write_latents(root, "train", 40, 5), write_latents(root, "val", 23, 5)
    ks = {split: (keys, rng.choice(GRID, len(keys))) for split, keys in (("train", train), ("val", val))}
    ks["val"] = (val[2:], ks["val"][1][2:])
    meta = {"rule": "test", "cost": "k", "budget": 12.0, "grid": GRID, "num_classes": 3}
    LatentCache(root).save_allocation(meta, ks)
    return root, {split: dict(zip(k, v.tolist(), strict=True)) for split, (k, v) in ks.items()}, val


@pytest.mark.parametrize("workers", [0, 2])
def test_val_reads_every_allocated_sample_once(cache, workers, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    root, ks, val = cache
    dm = WebDataModule(
        val=str(root / "val-*.tar"),
        kind="latents",
        val_batch_size=4,
        num_workers=workers,
        allocation=str(root / "allocation.json"),
    )
    dm.setup()
    keys = []
    for batch in dm.val_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        assert len(set(batch.k.tolist())) == 1
        assert all(ks["val"][key] == k for key, k in zip(batch.key, batch.k.tolist(), strict=True))
        keys += batch.key
    assert Counter(keys) == Counter(val[2:])
    assert dm.skipped == 2


def test_train_is_bucketed_with_exact_epochs(cache):
    root, ks, _ = cache
    dm = WebDataModule(
        train=str(root / "train-*.tar"),
        kind="latents",
        batch_size=4,
        batches_per_epoch=9,
        num_workers=2,
        shuffle_buffer=10,
        allocation=str(root),  # the cache folder works too
    )
    dm.setup()
    loader = dm.train_dataloader()
    for _epoch in range(2):
        batches = list(loader)
        assert len(batches) == 9
        for b in batches:
            assert b.latent.shape == (4, 8, 2) and len(set(b.k.tolist())) == 1
            assert all(ks["train"][key] == k for key, k in zip(b.key, b.k.tolist(), strict=True))


def test_allocation_errors_are_clear(cache, tmp_path):
    root, _, _ = cache
    with pytest.raises(ValueError, match="kind='latents'"):
        WebDataModule(val=str(root / "val-*.tar"), allocation=str(root))
    dm = WebDataModule(val=str(root / "val-*.tar"), kind="latents", allocation=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vlt allocate"):
        dm.setup()
    (tmp_path / "allocation.json").write_text(json.dumps({"grid": GRID}))
    dm = WebDataModule(val=str(root / "val-*.tar"), kind="latents", allocation=str(tmp_path))
    dm.setup()
    with pytest.raises(FileNotFoundError, match=r"k-val\.npz"):
        dm.val_dataloader()
