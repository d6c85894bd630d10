"""Output paths that stay inside their output folder, whatever a config or the command line says.

Names that become parts of output paths (a run name, a split) must be plain names: no separators,
no `..`, not absolute; `inside(root, *parts)` joins and refuses any result that resolves outside
`root` (symlinks included).
"""

from __future__ import annotations

import os
from pathlib import Path


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
