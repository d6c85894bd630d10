"""Streams that yield nothing fail with the shard names; counts arrive; `pipe:` needs an opt-in."""

from __future__ import annotations

import pytest

from tests.robustness.conftest import read_val, write_shard
from vlt.data import WebDataModule
from vlt.data.stream import StreamError


def first_batch(spec, workers: int, **kw):
    dm = WebDataModule(
        train=spec, image_size=16, batch_size=4, num_workers=workers, max_bad_in_a_row=50, **kw
    )
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_where_nothing_decodes_fails_naming_the_shards(tmp_path, workers):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_text("this is not a tar archive\n" * 100)
    with pytest.raises(StreamError, match=r"nothing usable.*(empty|text)\.tar"):
        first_batch(str(tmp_path / "*.tar"), workers)


def test_a_failing_pipe_command_fails_the_stream(tmp_path, monkeypatch):
    monkeypatch.setenv("VLT_ALLOW_PIPE", "1")
    with pytest.raises(StreamError, match="pipe:false"):
        first_batch("pipe:false", 0)


def test_pipe_urls_need_an_explicit_opt_in(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "a.tar", 3)
    monkeypatch.delenv("VLT_ALLOW_PIPE", raising=False)
    with pytest.raises(ValueError, match=r"VLT_ALLOW_PIPE=1.*allow_pipe"):
        WebDataModule(val=f"pipe:cat {shard}").setup()
    keys, _ = read_val(f"pipe:cat {shard}", allow_pipe=True)
    assert len(keys) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_arrive_when_no_batch_forms(tmp_path, workers):
    # Two readers: one gets only a broken shard, the other a good one. The broken one emits no batch.
    write_shard(tmp_path / "a-0.tar", 3)
    (tmp_path / "a-1.tar").write_bytes(write_shard(tmp_path / "x.tar", 5).read_bytes()[:1500])
    keys, dm = read_val([str(tmp_path / "a-0.tar"), str(tmp_path / "a-1.tar")], num_workers=workers)
    assert len(keys) == 3
    assert dm.shard_errors == 1 and dm.skipped == 1  # the truncation, and the sample it cut
