"""Pure-torch models: the stage-1 tokenizer, learnable global merging and its baselines, presets."""

from vlt.models.merge_ops import MergeTable
from vlt.models.merging import Merger, MergeResult, alignment_loss, hierarchy, straight_through
from vlt.models.registry import create, list_presets, register
from vlt.models.tokenizer import Encoded, Tokenizer, TokenizerConfig

__all__ = [
    "Encoded",
    "MergeResult",
    "MergeTable",
    "Merger",
    "Tokenizer",
    "TokenizerConfig",
    "alignment_loss",
    "create",
    "hierarchy",
    "list_presets",
    "register",
    "straight_through",
]
