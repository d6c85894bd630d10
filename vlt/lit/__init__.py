"""Thin LightningModules composing the pure-torch models and objectives, one per stage."""

from vlt.lit.dit import FlowSpec, LitDiT
from vlt.lit.joint import AlignEncoderSpec, JointSpec, LitJoint, PartLR
from vlt.lit.specs import LossSpec, MergeSpec, OptimSpec
from vlt.lit.tokenizer import LitTokenizer

__all__ = [
    "AlignEncoderSpec",
    "FlowSpec",
    "JointSpec",
    "LitDiT",
    "LitJoint",
    "LitTokenizer",
    "LossSpec",
    "MergeSpec",
    "OptimSpec",
    "PartLR",
]
