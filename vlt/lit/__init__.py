"""Thin LightningModules composing the pure-torch models and objectives, one per stage."""

from vlt.lit.dit import FlowSpec, LitDiT
from vlt.lit.specs import LossSpec, MergeSpec, OptimSpec
from vlt.lit.tokenizer import LitTokenizer

__all__ = ["FlowSpec", "LitDiT", "LitTokenizer", "LossSpec", "MergeSpec", "OptimSpec"]
