"""Small metadata files replaced atomically: temporary file, fsync, rename, fsync of the
directory, so a crash leaves the old content or the new one, never a torn file.

``FileMetaStore`` is the mirror's ``MetaStore`` (dirty bitmaps, activity logs, generation
identifiers) on top of it; persistent reservations (``prstore``) use ``write_atomic`` too.
"""

from __future__ import annotations

import os
import threading


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # Unique per writer: two threads replacing one file must not share a temporary name.
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def remove_durably(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class FileMetaStore:
    """``mirror.metastore.MetaStore`` in a directory: one file per record name."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, name: str) -> str:
        if not name or "/" in name or name in (".", "..") or "\x00" in name:
            raise ValueError(f"bad metadata record name {name!r}")
        return os.path.join(self.directory, name)

    def read(self, name: str) -> bytes | None:
        return read_file(self._path(name))

    def write(self, name: str, data: bytes) -> None:
        write_atomic(self._path(name), data)
