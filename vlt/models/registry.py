"""A tiny registry of preset factories, grouped by kind ("tokenizer", "dit", ...).

A preset is a one-line factory `name(**overrides) -> nn.Module`. Contract tests iterate
`list_presets(kind)`, so registering a preset is enough to have it tested.

    @register("tokenizer", "tiny")
    def tiny(**overrides) -> Tokenizer: ...

    model = create("tokenizer", "tiny", width=32)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_PRESETS: dict[str, dict[str, Callable[..., Any]]] = {}

# Modules that define the presets of a kind, imported on first lookup so `create("dit", ...)` works
# without the caller importing the model module first. A kind may also be registered from anywhere.
PROVIDERS: dict[str, str] = {"tokenizer": "vlt.models.tokenizer", "dit": "vlt.models.dit"}


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as preset `name` of `kind`. Registering a name twice is an error."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        presets = _PRESETS.setdefault(kind, {})
        if name in presets and presets[name] is not fn:
            raise ValueError(f"{kind} preset {name!r} is already registered")
        presets[name] = fn
        return fn

    return deco


def _load(kind: str) -> dict[str, Callable[..., Any]]:
    module = PROVIDERS.get(kind)
    if module is not None and kind not in _PRESETS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency inside the module
                raise
    return _PRESETS.get(kind, {})


def list_presets(kind: str) -> list[str]:
    """Sorted preset names of `kind` (empty when none are registered)."""
    return sorted(_load(kind))


def create(kind: str, name: str, **overrides: Any) -> Any:
    """Build preset `name` of `kind`, with keyword overrides of its config."""
    presets = _load(kind)
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; registered: {sorted(presets)}")
    return presets[name](**overrides)
