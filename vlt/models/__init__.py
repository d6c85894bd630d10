"""Pure-torch models: the stage-1 tokenizer, learnable global merging and its baselines, the DiT,
the global merge pattern, presets."""

from vlt.models.dit import DiT, DiTConfig
from vlt.models.merging import Merger, MergeResult, alignment_loss, hierarchy, straight_through
from vlt.models.pattern import MergePattern
from vlt.models.registry import create, expand_presets, list_presets, preset_config, register
from vlt.models.tokenizer import Encoded, Tokenizer, TokenizerConfig

__all__ = [
    "DiT",
    "DiTConfig",
    "Encoded",
    "MergePattern",
    "MergeResult",
    "Merger",
    "Tokenizer",
    "TokenizerConfig",
    "alignment_loss",
    "create",
    "expand_presets",
    "hierarchy",
    "list_presets",
    "preset_config",
    "register",
    "straight_through",
]
