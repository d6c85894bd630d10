"""Thin LightningModules composing the stage objects with losses, K policies and logging, one per stage."""

from vlt.checkpoints import allow_project_classes
from vlt.lit.dit import LitDiT
from vlt.lit.joint import LitJoint
from vlt.lit.tokenizer import LitTokenizer

__all__ = ["LitDiT", "LitJoint", "LitTokenizer"]

# Lightning loads checkpoints with weights_only=True: let it rebuild vlt's config dataclasses.
allow_project_classes()
