"""The stage objects and the one pattern, without training: round trips, shapes, refusals."""

from __future__ import annotations

import pytest
import torch

import vlt
from vlt.models.dit import DiTConfig
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.stages import LatentGenerator, VariableLengthTokenizer, export

TOK = TokenizerConfig(width=32, heads=2, enc_depth=1, dec_depth=1)  # N = 32, C = 16
DIT = DiTConfig(width=32, depth=1, heads=2)


def test_pattern_json_round_trip_and_nested_dropout_as_a_pattern(tmp_path):
    lgm = MergePattern.contiguous(32, [4, 8, 16], kind="lgm")
    assert MergePattern.load(lgm.save(tmp_path / "p.json")).equal(lgm) and lgm.nested()
    nested = MergePattern.truncation(32, [4, 8])
    z, fill = torch.randn(2, 32, 16), torch.full((16,), 7.0)
    tokens = nested.merge(z, 4)
    assert torch.equal(tokens, z[:, :4]) and torch.equal(nested.sizes(4), torch.ones(4))
    back = nested.unmerge(tokens, fill)  # the first K slots, the mask vector for the dropped ones
    assert torch.equal(back[:, :4], z[:, :4]) and (back[:, 4:] == 7.0).all()
    with pytest.raises(ValueError, match="not a map"):
        MergePattern(32, {4: torch.zeros(32, dtype=torch.long)})  # 1 of 4 tokens used


def test_tokenizer_export_round_trip_without_lightning_state(tmp_path):
    torch.manual_seed(0)
    tok = VariableLengthTokenizer(TOK, MergePattern.truncation(32, [4, 8]), fill=torch.randn(16)).eval()
    back = vlt.load(str(export(tok, tmp_path / "tok")))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for k in (4, 8, 32):
            assert torch.equal(back.reconstruct(x, k), tok.reconstruct(x, k))
    assert back.pattern.kind == "nested" and torch.equal(back.fill, tok.fill)


def test_a_tokenizer_of_another_pattern_is_refused():
    gen = LatentGenerator(DIT, MergePattern.contiguous(32, [4, 8], kind="lgm"), tokenizer=TOK)
    assert gen.tokenizer.pattern is gen.pattern  # one module, not a copy kept in step
    other = VariableLengthTokenizer(TOK, MergePattern.truncation(32, [4, 8]))
    with pytest.raises(ValueError, match=r"pattern mismatch: elsewhere .* K=\[4, 8\]"):
        gen.take_tokenizer(other, source="elsewhere")
    coarse = VariableLengthTokenizer(TOK, MergePattern.contiguous(32, [4]))
    with pytest.raises(ValueError, match="pattern mismatch"):
        gen.take_tokenizer(coarse, source="coarse")  # does not serve K = 8
    same = VariableLengthTokenizer(TOK, MergePattern.contiguous(32, [4, 8, 16]))
    gen.take_tokenizer(same, source="same")  # a finer grid with the same cuts is fine
    assert torch.equal(gen.tokenizer.net.slots, same.net.slots)
