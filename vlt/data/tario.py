"""Fast, careful reading of webdataset tar shards: tar members -> grouped samples, one pass, no tarfile.

Python's `tarfile` builds a TarInfo per member (a dozen octal fields, pax parsing); on 32x32 PNG
shards that costs about as much as decoding the image itself. Shards are plain ustar archives
(webdataset's TarWriter writes them), so this reader takes only the name, size and type of each
512-byte header and reads the data straight after it. It follows pax (`x`) and GNU long-name (`L`)
entries for long paths and skips directories, links and global headers.

Damage is never silent. Every header's checksum is verified; a corrupt header is reported and the
reader resynchronises at the next valid header, so one flipped byte costs one member, not the rest of
the shard. A shard that ends inside a member, or without the end-of-archive blocks, or holds no
sample at all, is reported with its name. The sample being assembled when a shard breaks off is
yielded with `__error__` set (its members may be incomplete), so the decoder skips and counts it.
Member names are decoded as UTF-8, falling back to Latin-1 (every byte string decodes); names that
would escape a folder when extracted (absolute, or with `..` parts) mark their sample as bad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO, Any

import webdataset as wds

BLOCK = 512
RESYNC_LIMIT = 1 << 20  # blocks scanned for the next valid header before the rest of a shard is given up


class TarError(ValueError):
    """A shard that is not a readable tar archive (truncated, corrupt header, no samples)."""

    member: str | None = None  # the member being read when the archive broke off, if known


class Resynced(TarError):
    """A corrupt header was skipped; reading continues at the next valid one (carries the members read)."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # GNU base-256 size for members over 8 GB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field or b"0", 8)
    except ValueError as exc:
        raise TarError(f"corrupt tar header field {field!r}") from exc


def _valid_header(header: bytes) -> bool:
    """The ustar checksum: the sum of the header's bytes with the checksum field read as spaces."""
    try:
        stored = int(header[148:156].rstrip(b"\0 ").lstrip(b" ") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarError(f"truncated tar archive: a member wants {n} bytes, the file has {len(data)}")
    return data


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<name>\\n" records), if any."""
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return _text(kv[5:])
    return None


def _resync(stream: IO[bytes], offset: int) -> tuple[bytes, int]:
    """Scan block by block for the next header whose checksum is valid; (header, offset after it)."""
    for _ in range(RESYNC_LIMIT):
        header = stream.read(BLOCK)
        offset += len(header)
        if len(header) < BLOCK:
            raise TarError(f"corrupt tar header at byte {offset}: no valid header follows")
        if _valid_header(header):
            return header, offset
    raise TarError(f"corrupt tar header: no valid header in the next {RESYNC_LIMIT} blocks")


def _name(header: bytes) -> str:
    name = _text(header[0:100].split(b"\0", 1)[0])
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix and header[257:262] == b"ustar":
        name = _text(prefix) + "/" + name
    return name


def iter_members(
    stream: IO[bytes], on_error: Callable[[TarError], None] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream, in archive order.

    Raises TarError on a truncation (inside a member, or no end-of-archive blocks). A corrupt header
    goes to `on_error` (a `Resynced`) and reading continues at the next valid header; without
    `on_error` it raises.
    """
    long_name: str | None = None
    offset = 0
    while True:
        header = stream.read(BLOCK)
        offset += len(header)
        if len(header) < BLOCK:
            raise TarError("truncated tar archive: it ends without the end-of-archive blocks")
        if header.count(0) == BLOCK:
            return  # end of archive
        if not _valid_header(header):
            error = Resynced(f"corrupt tar header at byte {offset - BLOCK} (checksum mismatch)")
            if on_error is None:
                raise error
            on_error(error)
            header, offset = _resync(stream, offset)
            long_name = None
        size, kind = _octal(header[124:136]), header[156:157]
        regular = kind in (b"0", b"\0", b"7")
        name = (long_name if long_name is not None else _name(header)) if regular else None
        try:
            data = _read(stream, size)
            offset += size
            if size % BLOCK:
                offset += len(_read(stream, BLOCK - size % BLOCK))
        except TarError as exc:
            exc.member = name  # the member cut short, so its sample is counted
            raise
        if kind in (b"x", b"L"):
            long_name = _pax_path(data) if kind == b"x" else _text(data.rstrip(b"\0"))
            continue
        long_name = None  # directories, links, global headers carry no sample data
        if regular:
            yield name, data


def _split(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the key ends at the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def unsafe_name(name: str) -> bool:
    """True for names that would land outside a folder when extracted (absolute, `..` parts)."""
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def _samples(stream: IO[bytes], url: str, on_error: Callable[[TarError], None]) -> Iterator[dict[str, Any]]:
    """Group members into samples; the pending sample gets `__error__` if the shard breaks off."""
    sample: dict[str, Any] = {}
    count = 0
    try:
        for name, data in iter_members(stream, on_error):
            key, ext = _split(name)
            if not ext or key.startswith("__") or ext.startswith("_"):
                continue
            if sample and (key != sample["__key__"] or ext in sample):
                count += 1
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, "__url__": url}
                if unsafe_name(name):
                    sample["__error__"] = f"unsafe member name {name!r} (absolute or '..')"
            sample[ext] = data
    except TarError as exc:
        cut = getattr(exc, "member", None)
        cut_key = _split(cut)[0] if cut else None
        if sample and cut_key not in (None, sample["__key__"]):
            yield sample  # complete: the member cut short starts the next sample
            sample = {}
        if not sample and cut_key is not None:
            sample = {"__key__": cut_key, "__url__": url}
        if sample:
            sample["__error__"] = f"the shard breaks off inside this sample: {exc}"
            yield sample
        raise
    if sample:
        count += 1
        yield sample
    if count == 0:
        raise TarError("the shard holds no samples")


def tar_samples(
    src: Iterator[dict[str, Any]], handler: Callable[[Exception], bool] = wds.reraise_exception
) -> Iterator[dict[str, Any]]:
    """Shard dicts {"url": ...} -> samples {"__key__", "__url__", ext: bytes, ...}.

    Consecutive members with the same key form one sample (webdataset's grouping rule). A problem
    with a shard goes to `handler` with the url in the exception's args (True: continue); samples
    read before it are kept, the one cut short is marked with `__error__`.
    """
    for shard in src:
        url = shard["url"]

        def report(exc: Exception, url: str = url) -> None:
            exc.args = (*exc.args, url)
            if not handler(exc):
                raise exc

        try:
            with wds.gopen(url, "rb") as stream:
                yield from _samples(stream, url, report)
        except Exception as exc:
            report(exc)
