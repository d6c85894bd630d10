"""The tar reader notices every truncation and corruption, counts what it cost, and reads on."""

from __future__ import annotations

import logging
import tarfile

from tests.robustness.conftest import read_val, sample_members, write_shard, write_tar

N = 4


def first_headers(path) -> list[int]:
    """Byte offset of each sample's first member header."""
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers() if m.name.endswith(".png")]


def test_every_truncation_is_counted_and_warned(tmp_path, caplog):
    shard = write_shard(tmp_path / "full.tar", N)
    data, starts = shard.read_bytes(), first_headers(shard)
    with tarfile.open(shard) as tar:
        end = max(m.offset_data + m.size for m in tar.getmembers())
    cuts = sorted({*range(0, end + 512, 512), *range(7, end, 301)})
    for cut in cuts:
        part = tmp_path / f"cut{cut}.tar"
        part.write_bytes(data[:cut])
        with caplog.at_level(logging.WARNING):
            keys, dm = read_val(str(part))
        started = sum(start + 512 <= cut for start in starts)
        assert len(keys) + dm.skipped == started, cut  # the sample cut short is skipped, not half-read
        assert dm.shard_errors == 1 and part.name in caplog.text, cut
        caplog.clear()


def test_undecodable_and_unsafe_names(tmp_path):
    members = [*sample_members("ok0", 0)]
    members += [(b"caf\xe9-\xff.png", sample_members("x", 1)[0][1])]  # not UTF-8: read as Latin-1
    members += [("../escape.png", sample_members("y", 2)[0][1]), ("/abs/z.png", sample_members("z", 3)[0][1])]
    members += [*sample_members("ok1", 4)]
    keys, dm = read_val(str(write_tar(tmp_path / "names.tar", members)))
    assert keys == ["ok0", "caf\xe9-\xff", "ok1"] and dm.skipped == 2 and dm.shard_errors == 0


def test_a_flipped_header_byte_costs_one_member(tmp_path):
    shard = write_shard(tmp_path / "a.tar", 6)
    data = bytearray(shard.read_bytes())
    data[first_headers(shard)[2] + 3] ^= 0x20  # the name of sample 2's image member
    shard.write_bytes(bytes(data))
    keys, dm = read_val(str(shard))
    assert len(keys) == 5 and dm.skipped == 1 and dm.shard_errors == 1  # sample 2 lost its image
