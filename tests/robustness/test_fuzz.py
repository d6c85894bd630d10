"""Seeded fuzzing of real shards through the DataModule: no crash, no hang, every sample accounted for.

Each trial mutates one shard of a synthetic set (a byte flip, a truncation, a member deleted or
renamed, a metadata edit) and reads the whole set. Where sample boundaries survive, every sample the
archive still holds is either read or skipped: read + skipped == samples.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from tests.robustness.conftest import read_val, write_tar
from vlt.data import builders

TRIALS = 240
BAD_META = [
    b"{bad json",
    b'{"label": NaN}',
    b'{"complexity": "x"}',
    b'{"label": 1e30}',
    b'{"label": -7}',
    b"[]",
]


def members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def groups(names: list[str]) -> int:
    """Samples by webdataset's rule: consecutive members with one key (key = name up to the first dot)."""
    count, key, exts = 0, None, set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        k, ext = (
            (name[: len(name) - len(base) + base.index(".")], base[base.index(".") + 1 :])
            if "." in base
            else (name, "")
        )
        if not ext:
            continue
        if k != key or ext in exts:
            count, key, exts = count + 1, k, set()
        exts.add(ext)
    return count


def first_headers(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        seen, starts = set(), []
        for m in tar.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in seen:
                seen.add(key)
                starts.append(m.offset)
        return starts


def mutate(data: bytes, rng: random.Random, out: Path) -> tuple[str, int]:
    """Write a mutated copy of shard `data` to `out`; (kind, samples it must account for)."""
    kind = rng.choice(["flip", "truncate", "delete", "rename", "meta"])
    parts = members(data)
    n = groups([name for name, _ in parts])
    if kind == "flip":
        raw = bytearray(data)
        pos = rng.randrange(len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
        out.write_bytes(bytes(raw))
        return kind, n
    if kind == "truncate":
        cut = rng.randrange(len(data))
        out.write_bytes(data[:cut])
        return kind, sum(start + 512 <= cut for start in first_headers(data))
    i = rng.randrange(len(parts))
    name, payload = parts[i]
    if kind == "delete":
        del parts[i]
    elif kind == "rename":
        key, ext = name.split(".", 1)
        parts[i] = (
            rng.choice([f"{key}.xyz", f"other{rng.randrange(9)}.{ext}", parts[(i + 1) % len(parts)][0]]),
            payload,
        )
    else:
        json_at = [j for j, (nm, _) in enumerate(parts) if nm.endswith(".json")]
        j = rng.choice(json_at)
        parts[j] = (parts[j][0], rng.choice([*BAD_META, json.dumps({"label": 3, "complexity": 5}).encode()]))
    write_tar(out, parts)
    return kind, groups([nm for nm, _ in parts])


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-src")
    builders.synthetic(out=str(root), n_train=8, n_val=18, shard_size=6, progress=False)
    return root


@pytest.mark.timeout(300)
def test_random_mutations_never_crash_hang_or_lose_count(real_shards, tmp_path):
    rng = random.Random(20260516)
    sources = sorted(real_shards.glob("val-*.tar"))
    counts = {path.name: groups([n for n, _ in members(path.read_bytes())]) for path in sources}
    kinds: dict[str, int] = {}
    damaged = {"skipped": 0, "shard_errors": 0}  # trials where the mutation cost something
    for trial in range(TRIALS):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        target = rng.randrange(len(sources))
        for s, path in enumerate(sources):
            if s != target:
                (folder / path.name).write_bytes(path.read_bytes())
        kind, expected = mutate(sources[target].read_bytes(), rng, folder / sources[target].name)
        kinds[kind] = kinds.get(kind, 0) + 1
        keys, dm = read_val(str(folder / "val-*.tar"))
        others = sum(c for name, c in counts.items() if name != sources[target].name)
        assert len(keys) + dm.skipped == others + expected, (trial, kind, dm.skipped, dm.shard_errors)
        if kind == "truncate" and expected < counts[sources[target].name]:
            assert dm.shard_errors >= 1, (trial, kind)
        damaged["skipped"] += dm.skipped > 0
        damaged["shard_errors"] += dm.shard_errors > 0
    assert min(kinds.values()) >= 30 and sum(kinds.values()) == TRIALS
    assert min(damaged.values()) >= 30, damaged  # the mutations did reach the reader
