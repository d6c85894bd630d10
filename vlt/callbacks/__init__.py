"""Lightning callbacks: token-budget curves (rFID/gFID/PSNR vs tokens and FLOPs), pictures, progress, guards.

Names are imported lazily, so `vlt curves` (vlt.callbacks.curves) starts without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"BudgetModule": "vlt.callbacks.token_budget", "TokenBudgetCallback": "vlt.callbacks.token_budget"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlt.callbacks' has no attribute {name!r}")
