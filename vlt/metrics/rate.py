"""Rate side of the rate-distortion curves: tokens, forward FLOPs and PSNR.

Letters: B batch, C channels, H/W height/width, L sequence length, D width.

FLOPs follow the usual convention of 2*m*n*k per matmul (one multiply and one add), the one
`torch.utils.flop_counter.FlopCounterMode` uses, so an analytic count and a measured one agree.
Norms, softmax and activations are left out: they are a few percent at these widths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vlt.objectives.recon import psnr  # noqa: F401  (re-exported: one definition for logs and curves)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch registers FLOP formulas for the CUDA attention kernels but not for the CPU flash kernel,
# so without this entry a CPU count silently drops QK^T and AV.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


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


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs per image, split into named parts (e.g. encoder, merge, decoder, DiT x steps).

    Parts add up, scale (sampling steps, 2x for classifier-free guidance) and print as a table,
    so a `budget_flops` implementation can say where its compute goes.
    """

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    @property
    def tflops(self) -> float:
        return self.total / 1e12

    def __add__(self, other: FlopsReport) -> FlopsReport:
        merged = dict(self.parts)
        for name, value in other.parts.items():
            merged[name] = merged.get(name, 0.0) + value
        return FlopsReport(merged)

    def scale(self, factor: float) -> FlopsReport:
        """All parts times `factor` (e.g. the number of sampling steps)."""
        return FlopsReport({name: value * factor for name, value in self.parts.items()})

    @classmethod
    def measure(
        cls, name: str, fn: Callable[..., Any], *args: Any, per: int = 1, **kwargs: Any
    ) -> FlopsReport:
        """Count the FLOPs of `fn(*args, **kwargs)` with FlopCounterMode, divided by `per` (the batch)."""
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            fn(*args, **kwargs)
        return cls({name: counter.get_total_flops() / per})

    def table(self) -> str:
        """Markdown table of the parts in GFLOPs with their share of the total."""
        total = self.total or 1.0
        lines = ["| part | GFLOPs | share |", "|---|---:|---:|"]
        for name, value in self.parts.items():
            lines.append(f"| {name} | {value / 1e9:.4f} | {100 * value / total:.1f}% |")
        lines.append(f"| total | {self.gflops:.4f} | 100.0% |")
        return "\n".join(lines)
