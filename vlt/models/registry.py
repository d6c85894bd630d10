"""A tiny registry of size presets, grouped by kind ("tokenizer", "dit", ...).

A preset is a one-line function returning the config dataclass of its kind; the kind's model class
(registered once with `register_model`) builds it. Contract tests iterate `list_presets(kind)`, and
configs name presets (`dit: {preset: s, num_classes: 1000}`, see `expand_presets`), so registering
a preset is enough to have it tested and usable from a config file.

    @register("tokenizer", "tiny")
    def tiny() -> TokenizerConfig: ...

    cfg = preset_config("tokenizer", "tiny", width=32)   # the config, nothing built
    model = create("tokenizer", "tiny", width=32)        # Tokenizer(cfg)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

_PRESETS: dict[str, dict[str, Callable[[], Any]]] = {}
_MODELS: dict[str, Callable[[Any], Any]] = {}

# Modules that define the presets of a kind, imported on first lookup so `create("dit", ...)` works
# without the caller importing the model module first. A kind may also be registered from anywhere.
PROVIDERS: dict[str, str] = {"tokenizer": "vlt.models.tokenizer", "dit": "vlt.models.dit"}
PRESET_KEY = "preset"


def register(kind: str, name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: register `fn() -> config` as preset `name` of `kind` (a name registered twice: error)."""

    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        presets = _PRESETS.setdefault(kind, {})
        if name in presets and presets[name] is not fn:
            raise ValueError(f"{kind} preset {name!r} is already registered")
        presets[name] = fn
        return fn

    return deco


def register_model(kind: str, build: Callable[[Any], Any]) -> None:
    """The model class (or factory) that `create` builds the configs of `kind` with."""
    _MODELS[kind] = build


def _load(kind: str) -> dict[str, Callable[[], Any]]:
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


def preset_config(kind: str, name: str, **overrides: Any) -> Any:
    """The config of preset `name` of `kind`, with keyword overrides of its fields."""
    presets = _load(kind)
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; registered: {sorted(presets)}")
    base = presets[name]()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(base)})
    if unknown:
        raise ValueError(f"{kind} preset {name!r} has no fields {unknown}")
    return dataclasses.replace(base, **overrides)


def create(kind: str, name: str, **overrides: Any) -> Any:
    """Build preset `name` of `kind`, with keyword overrides of its config."""
    cfg = preset_config(kind, name, **overrides)
    if kind not in _MODELS:
        raise ValueError(f"no model class registered for {kind!r} presets (register_model)")
    return _MODELS[kind](cfg)


def expand_presets(tree: Any) -> Any:
    """A config tree with every mapping that names a preset replaced by the preset's fields.

    `{dit: {preset: s, num_classes: 1000}}` becomes `{dit: {<every field of dit preset s>, num_classes:
    1000}}`: the listed fields override the preset's. The kind is the key the mapping sits under, with
    a `_config` suffix dropped (`tokenizer_config: {preset: b}` is a tokenizer preset). Override values
    are kept as written (interpolations included), for the config parser to check and resolve.
    """
    if isinstance(tree, list):
        return [expand_presets(item) for item in tree]
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and PRESET_KEY in value:
            kind = str(key).removesuffix("_config")
            if not list_presets(kind):
                raise ValueError(f"{key}: {{preset: ...}} names no preset kind; kinds: {sorted(PROVIDERS)}")
            rest = {k: v for k, v in value.items() if k != PRESET_KEY}
            base = dataclasses.asdict(preset_config(kind, str(value[PRESET_KEY])))
            unknown = sorted(set(rest) - set(base))
            if unknown:
                raise ValueError(f"{key}: {kind} preset {value[PRESET_KEY]!r} has no fields {unknown}")
            out[key] = {**base, **rest}
        else:
            out[key] = expand_presets(value)
    return out
