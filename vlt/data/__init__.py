"""vlt.data: webdataset shards in, batches out (WebDataModule), and the embedded shard builders.

Names are imported lazily, so `vlt data ...` (the builders) starts without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "WebDataModule": "vlt.data.datamodule",
    "SkippedSamples": "vlt.data.datamodule",
    "resolve_shards": "vlt.data.shards",
    "shard_info": "vlt.data.shards",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlt.data' has no attribute {name!r}")
