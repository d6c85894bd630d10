"""Output paths that stay inside their output folder, whatever a config or the command line says.

Names that become parts of output paths (a run name, a split) must be plain names: no separators,
no `..`, not absolute; `inside(root, *parts)` joins and refuses any result that resolves outside
`root` (symlinks included). `replace_with(path, write)` writes a file whole or not at all (a temporary
name in the same folder, then an atomic rename), so a killed job never leaves a half-written output.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def check_name(value: str, what: str) -> str:
    """Return `value` if it is a plain file name (one path part, not "." or ".."), else a ValueError."""
    text = str(value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise ValueError(
            f"{what}={value!r} must be a plain name (no '/', '\\\\', '..'): it names a file or folder "
            "inside the output folder"
        )
    return text


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """`root / parts...`, refusing (ValueError) a path that resolves outside `root`."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"output path {Path(root).joinpath(*parts)} would leave its output folder {root}")
    return path


def temporary_name(path: Path) -> Path:
    """The hidden temporary name `replace_with` writes `path` under first (`.name.tmp<pid>`)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def replace_with(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
