"""The stage objects: pure-torch owners of each stage's inference contract, and their exports.

    VariableLengthTokenizer   stage 1: encode, tokenize at K, detokenize, reconstruct, FLOPs
    LatentGenerator           stage 2: generate at K or per-image K, FLOPs (decodes with its tokenizer)
    load(path)                either, from an export folder or a stage / joint checkpoint

No Lightning here: `vlt.load(folder)` works in a plain torch process.
"""

from vlt.stages.export import export, load
from vlt.stages.generator import AdaptiveSamples, DecidedSamples, LatentGenerator
from vlt.stages.tokenizer import Tokens, VariableLengthTokenizer

__all__ = [
    "AdaptiveSamples",
    "DecidedSamples",
    "LatentGenerator",
    "Tokens",
    "VariableLengthTokenizer",
    "export",
    "load",
]
