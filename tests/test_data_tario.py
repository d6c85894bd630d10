"""vlt's tar reader agrees with webdataset's, follows long names, and counts broken shards."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from vlt.data.tario import TarError, iter_members, tar_samples


def write_tar(path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def members(n: int, prefix: str = "") -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"{prefix}s{i}.png", bytes([i]) * (100 + 300 * i)), (f"{prefix}s{i}.cls", str(i).encode())]
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_samples_as_webdataset(tmp_path, fmt):
    long = "d" * 120 + "/sub.dir/" if fmt != tarfile.USTAR_FORMAT else "dir/"
    path = str(tmp_path / "a.tar")
    write_tar(path, members(5, long), fmt)
    ours = list(tar_samples(iter([{"url": path}])))
    theirs = [
        {k: v for k, v in s.items() if k != "__local_path__"}
        for s in wds.WebDataset(path, shardshuffle=False)
    ]
    assert ours == theirs and len(ours) == 5 and ours[1]["__key__"] == f"{long}s1"


def test_truncated_shard_goes_to_handler_after_good_samples(tmp_path):
    path = tmp_path / "a.tar"
    write_tar(path, members(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TarError, match="truncated"):
        list(iter_members(io.BytesIO(path.read_bytes())))
    errors = []
    got = list(tar_samples(iter([{"url": str(path)}] * 2), handler=lambda e: errors.append(e) or True))
    assert len(errors) == 2 and all(str(path) in e.args for e in errors)
    assert [s["__key__"] for s in got][:2] == ["s0", "s1"]
    assert all(set(s) >= {"png", "cls"} for s in got if s["__key__"] == "s0")
