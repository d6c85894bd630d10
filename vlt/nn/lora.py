"""Low-rank adapters (LoRA) per sequence length: one base linear, one adapter per K.

Letters: B batch, L sequence length (K merged tokens), I input width, O output width, R rank.

The paper's "a DiT per K" rows fine-tune a shared base DiT with a length-specific adapter: W x + s B A x
with A (R, I), B (O, R) and s = alpha / R. Inside a DiT every adapted linear sees (B, K, D) tokens, so
the adapter is chosen by the sequence length of the input: the layer adds the adapter named K when it
has one and is the plain base linear otherwise. The choice is a pure function of the input (no mode
flag to set and forget); a K without an adapter runs the base network unchanged.

`LoRALinear` is an `nn.Linear`, so the base keeps its state-dict keys (`...qkv.weight`) and a base DiT's
weights load into an adapted one with only the adapter keys (`...qkv.adapters.<K>.a`) new.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


class LoRAAdapter(nn.Module):
    """A (R, I) and B (O, R): the update s B A x. B starts at zero, so a new adapter changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.scale = alpha / rank
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # nn.Linear's init, as LoRA does

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., I) -> (..., O) update."""
        return (x @ self.a.T) @ self.b.T * self.scale


class LoRALinear(nn.Linear):
    """A linear layer with one adapter per sequence length K, chosen by x.shape[-2].

    Args:
        in_features, out_features, bias: as nn.Linear.
        ks: the K values that get an adapter.
        rank, alpha: adapter rank R and scale numerator (update scale alpha / R).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        ks: Iterable[int],
        rank: int,
        alpha: float,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.adapters = nn.ModuleDict(
            {str(int(k)): LoRAAdapter(in_features, out_features, rank, alpha) for k in ks}
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, I) -> (B, L, O); the adapter of K = L is added when there is one."""
        out = super().forward(x)
        name = str(x.shape[-2]) if x.ndim >= 2 else None
        return out + self.adapters[name](x) if name in self.adapters else out


def _adapted(linear: nn.Linear, ks: Sequence[int], rank: int, alpha: float) -> LoRALinear:
    """A LoRALinear sharing `linear`'s weight and bias (same tensors, not copies)."""
    layer = LoRALinear(
        linear.in_features, linear.out_features, ks=ks, rank=rank, alpha=alpha, bias=linear.bias is not None
    )
    layer.weight = linear.weight
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer.to(linear.weight.device)


def add_lora(module: nn.Module, targets: Sequence[str], ks: Sequence[int], *, rank: int, alpha: float) -> int:
    """Replace every nn.Linear of `module` whose qualified name ends with one of `targets` (e.g.
    "attn.qkv") by a LoRALinear with adapters for `ks`. Returns how many layers were adapted."""
    found = [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear)
        and not isinstance(child, LoRALinear)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]
    for name, child in found:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, _adapted(child, ks, rank, alpha))
    return len(found)


def lora_parameters(module: nn.Module, k: int | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the adapters in `module`: all of them, or only those of K = k."""
    for name, param in module.named_parameters():
        parts = name.split(".")
        if "adapters" in parts and (k is None or parts[parts.index("adapters") + 1] == str(k)):
            yield name, param
