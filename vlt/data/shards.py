"""Shard sets on disk: resolving shard specs for reading, and writing split shard sets.

Layout (img2dataset style): `<out>/train-000000.tar ...`, `<out>/val-000000.tar ...`, `<out>/info.json`.
Each sample holds `__key__`, an image member (`png`, `jpg`, ...), `cls` (the integer label as text) and
`json` ({"label", "complexity", "source", ...}). Tar members get a fixed integer mtime: the same inputs
give byte-identical shards, and no per-member pax header (a float mtime adds one, doubling the tar
headers every reader has to parse).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import braceexpand

SPLITS: tuple[str, ...] = ("train", "val")
PIPE_ENV = "VLT_ALLOW_PIPE"
HINT = "build the embedded sets with `make data` (or `vlt data ...`), or check the path"


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of a split, as `SplitWriter` writes it: `train-000042.tar`."""
    return f"{split}-{index:06d}.tar"


def shard_names(split: str, n_samples: int, shard_size: int) -> list[str]:
    """The shard files `SplitWriter` writes for `n_samples` samples at `shard_size` per shard."""
    return [shard_name(split, i) for i in range(-(-n_samples // shard_size))]


def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def pipes_allowed(allow_pipe: bool = False) -> bool:
    """`pipe:` urls run shell commands: only with allow_pipe=True or VLT_ALLOW_PIPE=1 in the environment."""
    return allow_pipe or os.environ.get(PIPE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_pipe(url: str, allow_pipe: bool = False) -> None:
    """Refuse a `pipe:` url unless pipes are allowed, naming the command and the opt-in."""
    if url.startswith("pipe:") and not pipes_allowed(allow_pipe):
        raise ValueError(
            f"shard url {url!r} runs the shell command {url[5:]!r}; `pipe:` urls are off by default "
            f"because a shared config could run anything. Allow them with {PIPE_ENV}=1 in the "
            "environment or data.init_args.allow_pipe=true, after checking the command"
        )


def resolve_shards(spec: str | list[str], *, allow_pipe: bool = False) -> list[str]:
    """Expand a shard spec into a list of urls, raising a ValueError that names what matched nothing.

    Accepts a local path, a brace pattern (`x/train-{000000..000009}.tar`), a glob pattern
    (`x/train-*.tar`, expanded here and sorted, since webdataset does not glob), a list of any of
    these, and `scheme://` urls, which are brace-expanded and passed through unchecked; `pipe:`
    urls too, only when allowed (`check_pipe`).
    Failing here, at setup, beats a DataLoader that hangs or a worker that dies later.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        found: list[str] = []
        for url in braceexpand.braceexpand(str(item)):
            check_pipe(url, allow_pipe)
            if _is_remote(url):
                found.append(url)
            elif glob.has_magic(url):
                found.extend(sorted(glob.glob(url)))
            elif os.path.isfile(url):
                found.append(url)
            else:
                raise ValueError(f"shard {url!r} (from {item!r}) does not exist (cwd {os.getcwd()}); {HINT}")
        if not found:
            raise ValueError(f"shard pattern {item!r} matches no file (cwd {os.getcwd()}); {HINT}")
        urls.extend(found)
    if not urls:
        raise ValueError(f"shard spec {spec!r} is an empty set of shards; {HINT}")
    return urls


def shard_info(urls: list[str]) -> dict[str, Any] | None:
    """The info.json beside the first local shard, or None (remote shards, or no info.json)."""
    if not urls or _is_remote(urls[0]):
        return None
    path = Path(urls[0]).parent / "info.json"
    return json.loads(path.read_text()) if path.is_file() else None


class SplitWriter:
    """Writes samples into `<out>/<split>-%06d.tar` shards (one ShardWriter per split) and info.json.

    Use as a context manager; `write(split, key, image=..., ext=..., label=..., meta=...)` adds one
    sample, `counts` and `shards` tell what was written, `close(info)` writes info.json, which lists
    the samples and the shard files of each split ("counts", "split_shards": {split: [names]}).
    """

    def __init__(self, out: str | Path, *, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be >= 1")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        for old in self.out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            old.unlink()  # a smaller rebuild must not leave stale shards behind for globs to pick up
        self.shard_size = shard_size
        self.counts: dict[str, int] = {}
        self._writers: dict[str, Any] = {}  # split -> webdataset.ShardWriter

    def write(self, split: str, key: str, *, image: bytes, ext: str, label: int, meta: dict) -> None:
        """Add one sample; `meta` goes into the json member together with label (keys have no dots)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if split not in self._writers:
            pattern = str(self.out / f"{split}-%06d.tar")  # the names of `shard_name`
            import webdataset as wds  # here: it imports torch, which the builders do not need

            self._writers[split] = wds.ShardWriter(pattern, maxcount=self.shard_size, verbose=0, mtime=0)
        record = {"label": int(label), **meta}
        sample = {
            "__key__": key,
            ext: image,
            "cls": str(int(label)).encode(),
            "json": json.dumps(record, sort_keys=True).encode(),
        }
        self._writers[split].write(sample)
        self.counts[split] = self.counts.get(split, 0) + 1

    @property
    def shards(self) -> int:
        """Number of shard files written so far."""
        return sum(w.shard for w in self._writers.values() if hasattr(w, "shard"))

    def close(self, info: dict[str, Any]) -> int:
        """Close all shards, write info.json (counts and shard count added); returns the shard count."""
        n_shards = self.shards
        names = {s: [shard_name(s, i) for i in range(w.shard)] for s, w in self._writers.items()}
        for writer in self._writers.values():
            writer.close()
        full = {"counts": {s: self.counts.get(s, 0) for s in SPLITS}, "shards": n_shards, **info}
        full["split_shards"] = {s: names.get(s, []) for s in SPLITS}
        (self.out / "info.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        return n_shards

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in self._writers.values():
            if getattr(writer, "tarstream", None) is not None:
                writer.finish()
