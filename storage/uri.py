"""fsspec URIs: local paths by default, `s3://...` (and any fsspec protocol) where installed.

Writes are atomic: the data goes to a temporary name in the same folder and is renamed to its
final name only when complete, so a crash never leaves a half file under a final name.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as err:  # e.g. s3fs missing
        raise RuntimeError(
            f"cannot open {uri}: {err}. Install the extra, e.g. pip install 'vita-corpus[s3]'"
        ) from None


def is_local(uri: str) -> bool:
    return isinstance(fs_and_path(uri)[0], LocalFileSystem)


def join(base: str, *parts: str) -> str:
    if "://" in base:
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def makedirs(uri: str) -> None:
    fs, path = fs_and_path(uri)
    fs.makedirs(path, exist_ok=True)


def exists(uri: str, fresh: bool = False) -> bool:
    """Whether `uri` exists; `fresh` asks the store itself, not a listing cached earlier (for a
    file that another process is expected to create)."""
    fs, path = fs_and_path(uri)
    if fresh:
        fs.invalidate_cache(path)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def open_read(uri: str) -> IO[bytes]:
    fs, path = fs_and_path(uri)
    return fs.open(path, "rb")


def listdir(uri: str) -> list[str]:
    """Base names in a folder, sorted; empty when the folder does not exist."""
    fs, path = fs_and_path(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(uri: str) -> None:
    fs, path = fs_and_path(uri)
    if fs.exists(path):
        fs.rm(path)


def rename(src: str, dst: str) -> None:
    """Move `src` to `dst` in the same store, replacing `dst` (atomic on a local disk)."""
    fs, path = fs_and_path(src)
    _move(fs, path, fs_and_path(dst)[1])


def _move(fs: fsspec.AbstractFileSystem, path: str, target: str) -> None:
    if isinstance(fs, LocalFileSystem):
        os.replace(path, target)
    else:
        fs.mv(path, target)


def size(uri: str) -> int:
    fs, path = fs_and_path(uri)
    return int(fs.size(path))


class AtomicFile:
    """A file written under a temporary name in its final folder; `commit` renames it into place.

    `discard` (or an exception inside a `with`) removes the temporary file. A process killed
    outright leaves it behind; `remove_stale_temps` clears those on the next run.
    """

    def __init__(self, target: str) -> None:
        self.fs, self.path = fs_and_path(target)
        remote = "://" in target
        split, joinp = (posixpath.split, posixpath.join) if remote else (os.path.split, os.path.join)
        folder, name = split(self.path)
        self.tmp = joinp(folder, f"{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(folder, exist_ok=True)
        self.file: IO[bytes] = self.fs.open(self.tmp, "wb")
        self.done = False

    def commit(self) -> None:
        self.file.close()
        _move(self.fs, self.tmp, self.path)
        self.done = True

    def discard(self) -> None:
        if self.done:
            return
        self.done = True
        self.file.close()
        with contextlib.suppress(Exception):
            self.fs.rm(self.tmp)


@contextlib.contextmanager
def atomic_write(target: str) -> Iterator[IO[bytes]]:
    """Open `target` for writing under a temporary name; rename into place on success."""
    af = AtomicFile(target)
    try:
        yield af.file
    except BaseException:
        af.discard()
        raise
    af.commit()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    with atomic_write(uri) as f:
        f.write(data)


def remove_stale_temps(folder_uri: str) -> list[str]:
    """Delete temporary files a killed run left behind; return their names."""
    removed = []
    for name in listdir(folder_uri):
        if TMP_MARK in name:
            remove(join(folder_uri, name))
            removed.append(name)
    return removed
