"""Any directory of images -> samples: file discovery, class names, and a per-file encode job.

ImageFolder layout (`root/<class>/<image>`) gives labels from the sorted class-folder names; images
directly in `root` (a flat folder) get label -1. The encode job runs in a multiprocessing pool, so it
is a plain top-level function that returns bytes or an error string, never raises.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from vlt.data.transforms import IMAGE_EXTENSIONS, decode_image, resize_short_side

FILE_EXTENSIONS: tuple[str, ...] = (*IMAGE_EXTENSIONS, "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class Entry:
    """One input file: its path, label (-1 in a flat folder) and a key unique within the set."""

    path: Path
    label: int
    key: str


def _key(rel: Path) -> str:
    # webdataset splits a member name at the first dot, so keys must not contain dots
    return "/".join(rel.with_suffix("").parts).replace(".", "_")


def scan(root: str | Path) -> tuple[list[Entry], list[str]]:
    """Files under `root` with an image extension (case-insensitive), sorted, and the class names.

    Class folders are the direct subfolders that contain images anywhere below them; files in
    `root` itself are unlabelled (-1). Both may coexist.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r} does not exist or is not a directory")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in FILE_EXTENSIONS
    )
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    entries = []
    for p in files:
        rel = p.relative_to(root)
        label = index[rel.parts[0]] if len(rel.parts) > 1 else -1
        entries.append(Entry(path=p, label=label, key=_key(rel)))
    return entries, classes


def encode_file(job: tuple[Entry, int | None]) -> tuple[Entry, bytes | None, str, str]:
    """(entry, resize) -> (entry, image bytes or None, extension, error message).

    Without resize the original bytes are kept (after a full decode proves them readable); with
    resize the short side is scaled to `resize` and the image re-encoded as PNG (lossless).
    """
    entry, resize = job
    try:
        data = entry.path.read_bytes()
        img = decode_image(data)
        if resize is None:
            ext = entry.path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            if ext in IMAGE_EXTENSIONS:
                return entry, data, ext, ""
        else:
            img = resize_short_side(img, resize)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return entry, buf.getvalue(), "png", ""
    except Exception as exc:  # undecodable input is counted by the caller, never fatal
        return entry, None, "", f"{type(exc).__name__}: {exc}"
