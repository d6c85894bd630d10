"""Thin LightningModules composing the pure-torch models and objectives, one per stage."""

from vlt.lit.specs import LossSpec, MergeSpec, OptimSpec
from vlt.lit.tokenizer import LitTokenizer

__all__ = ["LitTokenizer", "LossSpec", "MergeSpec", "OptimSpec"]
