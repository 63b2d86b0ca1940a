"""Atomic writes: the one way llmrun replaces a file. The new content goes to a temporary file in the same
directory (so the rename cannot cross filesystems), is fsynced, then `os.replace`d over the target: a reader
sees the old file or the new one, never a torn one, and a crash or an error leaves the old file as it was. The
temporary file is removed on any failure (an exception, Ctrl-C). With `fsync_dir`, the directory is fsynced
after the rename, so the rename itself survives a power cut.

Temporary files are named `NAME.<random>.tmp` (or the given suffix) and created with the mode a plain `open()`
would give (0666 less the umask), so the file that replaces the target has ordinary permissions.

OSErrors pass through unchanged: each caller knows what a failed write means for it (a UsageError naming the
path, or nothing at all for a cache)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

StrPath = str | os.PathLike[str]


def _create_temp(path: Path, suffix: str) -> tuple[int, Path]:
    """A new, empty file next to `path` (O_EXCL: never an existing file), opened for writing."""
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def fsync_directory(path: StrPath) -> None:
    """Make a rename in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: StrPath, *, suffix: str = ".tmp", fsync_dir: bool = False) -> Iterator[BinaryIO]:
    """A binary file to stream the new content of `path` into (large files: joins, extractions). When the block
    ends normally it is flushed, fsynced and renamed over `path`; when it raises, it is removed and `path` is
    untouched."""
    target = Path(path)
    fd, tmp = _create_temp(target, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync_dir:
        fsync_directory(target.parent)


@contextmanager
def atomic_path(path: StrPath, *, suffix: str = ".tmp", fsync_dir: bool = False) -> Iterator[Path]:
    """A temporary path for a writer that opens the file itself (gguf.GGUFWriter): write it inside the block.
    On a normal end it is fsynced and renamed over `path`; when the block raises, it is removed."""
    target = Path(path)
    fd, tmp = _create_temp(target, suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync_dir:
        fsync_directory(target.parent)


def atomic_write_bytes(path: StrPath, data: bytes, *, fsync_dir: bool = False) -> None:
    """Replace `path` with `data`, atomically."""
    with atomic_writer(path, fsync_dir=fsync_dir) as f:
        f.write(data)


def atomic_write_text(path: StrPath, text: str, *, encoding: str = "utf-8", fsync_dir: bool = False) -> None:
    """Replace `path` with `text`, atomically."""
    atomic_write_bytes(path, text.encode(encoding), fsync_dir=fsync_dir)


def atomic_write_json(path: StrPath, data: object, *, indent: int | None = 2, sort_keys: bool = False,
                      ensure_ascii: bool = True, fsync_dir: bool = False) -> None:
    """Replace `path` with `data` as JSON (and a final newline), atomically. A value JSON cannot hold raises
    TypeError or ValueError before anything is written."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    atomic_write_text(path, text, fsync_dir=fsync_dir)

