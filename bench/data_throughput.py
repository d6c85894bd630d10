"""Decoded images/s of WebDataModule's train loader at 0, 1, 2 workers vs a plain PIL loop.

    .venv/bin/python bench/data_throughput.py [--shards data/synthetic/shards] [--images 4096]

The plain loop reads the same shard members with tarfile, decodes each image with PIL and turns it
into a float tensor in [-1, 1] one by one: the floor any loader must beat. Loader timings start
once the shuffle buffers are full, so worker start-up and the buffer fill (paid once per run with
persistent workers) are excluded; the loader does more per image than the baseline (shuffle
buffer, flip, labels, json).
All rows are measured in this one run, in `--rounds` interleaved rounds; each row reports its best
round, since on a shared machine other processes only ever slow a round down.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlt.data import WebDataModule
from vlt.data.builders import synthetic


def plain_loop(urls: list[str], n_images: int) -> float:
    """Images/s of tarfile + PIL decode + per-image float tensor, cycling over the shards."""
    done, start = 0, time.perf_counter()
    while done < n_images:
        for url in urls:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.name.endswith(".png"):
                        continue
                    img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
                    done += x.shape[0] > 0
                    if done >= n_images:
                        return done / (time.perf_counter() - start)
    return done / (time.perf_counter() - start)


def loader_rate(spec: str, workers: int, n_images: int, batch_size: int, shuffle_buffer: int) -> float:
    """Images/s of the train loader in steady state: timed once the shuffle buffers are full."""
    warmup = -(-shuffle_buffer // batch_size) * max(1, workers) + 1
    batches = n_images // batch_size + warmup
    dm = WebDataModule(
        train=spec,
        num_workers=workers,
        batch_size=batch_size,
        batches_per_epoch=batches,
        shuffle_buffer=shuffle_buffer,
    )
    dm.setup()
    it = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(it)
    start, done = time.perf_counter(), 0
    for batch in it:
        done += batch.image.shape[0]
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/synthetic/shards", help="folder with train-*.tar")
    parser.add_argument("--images", type=int, default=4096, help="images timed per row")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best round reported")
    parser.add_argument("--shuffle_buffer", type=int, default=1000, help="WebDataModule's default")
    args = parser.parse_args()
    folder = Path(args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        if not list(folder.glob("train-*.tar")):
            folder = Path(tmp)
            synthetic(out=tmp, n_train=4000, n_val=0, progress=False)
        urls = sorted(str(p) for p in folder.glob("train-*.tar"))
        spec = str(folder / "train-*.tar")
        best = {
            name: 0.0
            for name in ("plain PIL loop (tarfile)", *(f"WebDataModule, num_workers={w}" for w in (0, 1, 2)))
        }
        for _ in range(args.rounds):
            rates = [plain_loop(urls, args.images)]
            rates += [
                loader_rate(spec, w, args.images, args.batch_size, args.shuffle_buffer) for w in (0, 1, 2)
            ]
            best = {name: max(old, new) for (name, old), new in zip(best.items(), rates)}
        rows = list(best.items())
        base = rows[0][1]
    threads = torch.get_num_threads()
    print(f"\n{args.images} images of {folder} per row, best of {args.rounds} rounds, ", end="")
    print(f"batch {args.batch_size}, torch threads {threads}\n")
    print("| loader | images/s | vs plain loop |")
    print("|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
