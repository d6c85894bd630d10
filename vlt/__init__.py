"""vlt: variable-length image tokens by learnable global merging, and DiTs on them."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, **kwargs: Any) -> Any:
    """A stage object (`VariableLengthTokenizer` or `LatentGenerator`) from an export folder or a
    stage checkpoint; see `vlt.stages.export.load`. Imports no Lightning."""
    from vlt.stages.export import load as _load

    return _load(path, **kwargs)
