"""Analytic forward FLOPs of transformer stacks (2*m*n*k per matmul, the FlopCounterMode convention).

Letters: L sequence length, D width, F MLP hidden width.
"""

from __future__ import annotations


def transformer_flops(tokens: int, width: int, depth: int, mlp_hidden: int, *, gated: bool) -> int:
    """Analytic forward FLOPs of a pre-norm transformer stack on one sequence.

    Per block on L tokens of width D with MLP hidden width F:
    QKV 2*L*D*3D, QK^T 2*L*L*D, AV 2*L*L*D, output projection 2*L*D*D, and the MLP
    2*L*D*F*2 (GELU: D->F->D) or 2*L*D*F*3 (SwiGLU: D->2F, F->D).

    Args:
        tokens: sequence length L (merged tokens K, slots N or patches P).
        width: model width D.
        depth: number of blocks.
        mlp_hidden: hidden width F (for SwiGLU the gated width, i.e. the input of the last linear).
        gated: SwiGLU (three D*F matrices) instead of a two-matrix GELU MLP.

    Returns:
        FLOPs for one sequence (multiply by the batch for a batch).
    """
    if min(tokens, width, depth, mlp_hidden) < 0:
        raise ValueError("tokens, width, depth and mlp_hidden must be >= 0")
    n, d = tokens, width
    attention = 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d
    mlp = 2 * n * d * mlp_hidden * (3 if gated else 2)
    return depth * (attention + mlp)
