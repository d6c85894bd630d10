"""The `vlt` command: Lightning's subcommands plus vlt's own tools.

    vlt [-q] fit|validate -c conf/<stage>/<preset>.yaml [--key=value ...]
    vlt data synthetic|photos|folder|imagenet ...             build webdataset shards
    vlt cache-latents ... / vlt sample ... / vlt curves ...   (stage tools)
    vlt export CKPT OUT                                       stage checkpoint -> export folder(s)
    vlt convert --out OUT --tokenizer T --stats S --dit xl.pth    reference release files -> export folder(s)
    vlt eval SAMPLES --ref REF [--features inception|vltnet|proxy]   FID, sFID, IS, P/R, KID (ADM protocol)
    vlt allocate --cache <latents> --budget <mean K> ...      per-image K over the nested grid

Lightning's `test` and `predict` are refused (no stage has a test_step or predict_step): `vlt validate`
scores a checkpoint on the val data, `vlt sample` generates. This module imports neither torch nor
Lightning: a tool's module is imported only when it runs, and `fit` & co. import `vlt.lit.cli` (the
only module that knows YAML configs). `-q` (or VLT_QUIET=1) silences progress and summaries. List
options take space-separated values (`--k 8 16`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

# Extra commands: name -> "module:function-or-list" resolved lazily, so `vlt fit` never imports them.
TOOLS: dict[str, str] = {
    "data": "vlt.data.builders:COMMANDS",
    "cache-latents": "vlt.tools.cache_latents:cache_latents",
    "sample": "vlt.tools.sample:sample",
    "export": "vlt.tools.export:export_checkpoint",
    "convert": "vlt.tools.convert:convert",
    "curves": "vlt.callbacks.curves:curves",
    "allocate": "vlt.adaptive.command:allocate",
    "features": "vlt.metrics.features:features",
    "eval": "vlt.tools.evaluate:evaluate_samples",
}
# Positional paths a tool takes before its options: `vlt export CKPT OUT`, `vlt curves RUN [RUN ...]`.
LEADING: dict[str, tuple[str, ...]] = {"export": ("ckpt", "out"), "curves": ("runs",), "eval": ("samples",)}
# Lightning subcommands the stages do not implement (vlt.lit.cli.SUBCOMMANDS are the ones offered).
UNSUPPORTED: tuple[str, ...] = ("test", "predict")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _resolve(spec: str) -> Callable | list[Callable]:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def _leading_paths(args: list[str]) -> int:
    """How many arguments before the first option."""
    for i, a in enumerate(args):
        if a.startswith("-"):
            return i
    return len(args)


def _list_item(annotation: Any) -> type | None:
    """The item type of a list-typed parameter (`list[int]`, `list[int] | None`, `str | list[str]`)."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (str,)
        return item if isinstance(item, type) else str
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            item = _list_item(arg)
            if item is not None:
                return item
    return None


def list_options(fn: Callable) -> dict[str, type]:
    """`{option: item type}` for the list-typed parameters of a tool function."""
    hints = typing.get_type_hints(fn)
    return {
        name: item
        for name in inspect.signature(fn).parameters
        if (item := _list_item(hints.get(name))) is not None
    }


def _is_value(token: str) -> bool:
    return not token.startswith("-") or bool(_NUMBER.match(token))


def _as_item(token: str, item: type, option: str, prog: str) -> Any:
    try:
        return item(float(token)) if item is int and float(token).is_integer() else item(token)
    except ValueError:
        example = {int: "8 16", float: "1.0 1.5"}.get(item, "a b")
        raise SystemExit(
            f"{prog}: error: --{option} takes {item.__name__} values, got {token!r}; "
            f"e.g. --{option} {example}"
        ) from None


def join_list_options(fn: Callable, args: list[str], prog: str) -> list[str]:
    """Rewrite `--k 8 16` (space-separated values) as `--k=[8, 16]`, the form jsonargparse parses.

    `--k=[8,16]`, `--k '[8, 16]'` and `--k+ 8` keep working; a single value `--k 8` is a one-item list.
    """
    options = list_options(fn)
    out: list[str] = []
    i = 0
    while i < len(args):
        name = args[i][2:] if args[i].startswith("--") else ""
        if name not in options:
            out.append(args[i])
            i += 1
            continue
        j = i + 1
        while j < len(args) and _is_value(args[j]):
            j += 1
        if j == i + 2 and args[i + 1].startswith("["):  # already a list: `--k '[8, 16]'`
            out += args[i:j]
            i = j
            continue
        values = [_as_item(token, options[name], name, prog) for token in args[i + 1 : j]]
        if not values:
            raise SystemExit(f"{prog}: error: --{name} needs at least one value, e.g. --{name} 8 16")
        out.append(f"--{name}={json.dumps(values)}")
        i = j
    return out


def underscore_options(fn: Callable, args: list[str]) -> list[str]:
    """`--batch-size 8` -> `--batch_size 8` for the parameters of `fn` (both spellings work)."""
    params = set(inspect.signature(fn).parameters)
    out = []
    for a in args:
        name, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        out.append(f"--{name.replace('-', '_')}{eq}{value}" if name.replace("-", "_") in params else a)
    return out


def run_tool(tool: str, rest: list[str]) -> Any:
    import jsonargparse

    from vlt import console

    console.quiet_third_party()
    target = _resolve(TOOLS[tool])
    prog = f"vlt {tool}"
    leading = LEADING.get(tool, ())
    if leading:
        lead = rest[: _leading_paths(rest)]
        if leading == ("runs",):  # every leading path is a run
            rest = ([f"--runs={json.dumps(lead)}"] if lead else []) + rest[len(lead) :]
        else:
            lead = lead[: len(leading)]
            rest = [f"--{name}={value}" for name, value in zip(leading, lead)] + rest[len(lead) :]
    if isinstance(target, list):  # subcommands: `vlt data synthetic ...`
        by_name = {fn.__name__: fn for fn in target}
        if rest and rest[0] in by_name:
            rest = rest[:1] + join_list_options(by_name[rest[0]], rest[1:], f"{prog} {rest[0]}")
    else:
        rest = join_list_options(target, underscore_options(target, rest), prog)
    return jsonargparse.CLI(target, args=rest, prog=prog, as_positional=False)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not (args and args[0] in ("-q", "--quiet")):
        return _main(args)
    before = os.environ.get("VLT_QUIET")
    os.environ["VLT_QUIET"] = "1"  # this command only: an in-process call leaves the environment alone
    try:
        _main(args[1:])
    finally:
        if before is None:
            os.environ.pop("VLT_QUIET", None)
        else:
            os.environ["VLT_QUIET"] = before


def _main(args: list[str]) -> None:
    if args and args[0] in TOOLS:
        run_tool(args[0], args[1:])
        return
    if args and args[0] in UNSUPPORTED:
        raise SystemExit(
            f"vlt {args[0]}: not available: no vlt stage has a {args[0]}_step. Use `vlt validate -c CONFIG "
            f"--ckpt_path CKPT` to score a checkpoint on the val data, `vlt sample` to generate. Commands: "
            f"fit, validate, {', '.join(TOOLS)}"
        )
    if args and args[0] in ("-h", "--help"):
        print(f"vlt tools (each has --help): {', '.join(TOOLS)}\n")
    from vlt.lit.cli import VLTCLI

    VLTCLI(args=args)


if __name__ == "__main__":
    main()
