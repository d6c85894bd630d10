"""`vlt cache-latents` ranks: read from srun's variables; a restarted job redoes only unfinished ranks."""

from __future__ import annotations

import os

import pytest
import torch

from vlt.data.cache import LatentCache
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.stages import VariableLengthTokenizer, export
from vlt.tools.cache_latents import _rank_env, _rank_world, cache_latents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)  # N = 32, 32x32 images
    tok = VariableLengthTokenizer(cfg, MergePattern.contiguous(32, [4, 32]))
    return export(tok.eval(), tmp_path_factory.mktemp("tok") / "tokenizer")


def test_rank_and_world_come_from_srun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert _rank_world() == (0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")  # 2 nodes, as submit.sh asks
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_JOB_NAME", "vlt-cache-latents")
    assert _rank_world() == (3, 4)
    with _rank_env(3, 4):  # what webdataset's shard split reads, for the block only
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_a_restarted_job_skips_finished_ranks(tokenizer, tiny_shards, tmp_path, monkeypatch, capsys):
    common = {"tokenizer": str(tokenizer), "shards": tiny_shards["train"], "out": str(tmp_path)}
    common |= {"batch_size": 64, "distortion": False, "flip": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cache_latents(**common)  # rank 1 finished, rank 0 was killed
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*-r*")}
    assert any(p.name == "done-train-r1.json" for p in files)
    cache_latents(**common)  # the restarted job: rank 1 has nothing left to do
    assert "rank 1/2 of train is finished" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in files.items())
    monkeypatch.setenv("RANK", "0")
    cache_latents(**common)
    assert LatentCache(tmp_path).is_finished("train")
    assert LatentCache(tmp_path).meta("train")["samples"] == 256
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(FileExistsError, match="--overwrite"):  # a finished split is still refused
        cache_latents(**common)
