"""torch.compile for the transformer stacks, one block at a time ("regional compilation").

Compiling each repeated block instead of the whole network compiles the block's code once for the
whole stack, keeps data-dependent Python (the K policy, the size-bias check) outside the graphs, and
leaves parameter names alone: `nn.Module.compile` compiles in place, so checkpoints and exports of a
compiled model load into an uncompiled one and back.
"""

from __future__ import annotations

from torch import nn


def compile_blocks(root: nn.Module, kinds: tuple[type[nn.Module], ...], *, backend: str = "inductor") -> int:
    """Compile, in place, every submodule of `root` that is one of `kinds`; returns how many.

    Args:
        root: the network (a DiT, a tokenizer).
        kinds: the block classes to compile (e.g. `DiTBlock`, `vlt.nn.vit.Block`).
        backend: torch.compile's backend ("inductor" generates kernels; "eager" only traces, for tests).
    """
    blocks = [m for m in root.modules() if isinstance(m, kinds)]
    if not blocks:
        raise ValueError(f"{type(root).__name__} has no {', '.join(k.__name__ for k in kinds)} to compile")
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
