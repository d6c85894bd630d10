"""Rate side of the rate-distortion curves: tokens, forward FLOPs and PSNR.

Letters: B batch, C channels, H/W height/width, L sequence length, D width.

FLOPs follow the usual convention of 2*m*n*k per matmul (one multiply and one add), the one
`torch.utils.flop_counter.FlopCounterMode` uses, so an analytic count and a measured one agree.
Norms, softmax and activations are left out: they are a few percent at these widths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vlt.nn.flops import transformer_flops  # noqa: F401  (re-exported)
from vlt.objectives.recon import psnr  # noqa: F401  (re-exported: one definition for logs and curves)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch registers FLOP formulas for the CUDA attention kernels but not for the CPU flash kernel,
# so without this entry a CPU count silently drops QK^T and AV.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def measured_flops(fn: Callable[..., Any], *args: Any, per: int = 1, **kwargs: Any) -> float:
    """FLOPs of `fn(*args, **kwargs)` counted by FlopCounterMode, divided by `per` (e.g. the batch)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() / per
