"""The guarded open: how every file a reader or a worker opens from a source is opened.

A source's inputs name files (media paths, LibriSpeech transcripts found by walking its
folder) that nobody has looked at; any of them can be a symlink out of the source's root, a
FIFO that blocks a read forever, a device that never ends (/dev/zero), or a sparse 64 GiB
"image". So every such file is opened here, and only here:

- resolved inside the root: the real path (symlinks followed) must lie under the root's real
  path, before the open and again for the file actually opened (/proc/self/fd), so a symlink
  swapped in between does not escape either (`path_outside_root`);
- opened non-blocking, so a FIFO without a writer returns at once, then refused unless it is a
  regular file (`not_a_file`: FIFO, character or block device, socket);
- refused when its size passes its kind's limit (`file_too_large`, limits.max_file_mb), from
  fstat, before a byte is read;
- read with a bound: at most the limit, even if the file grows while it is read.

The file a source's config names (its JSON, JSONL or text file) is the user's own choice and
may live anywhere; it gets the same checks except the root's (`root=None`).
Remote stores (fsspec: s3://...) have no FIFOs or symlinks; there the type and the size come
from the store's listing.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Iterator
from typing import IO

from schemas.params import FileLimits
from schemas.rejects import Rejected
from storage import uri

KINDS = ("image", "video", "audio", "transcript", "manifest")

_TYPES = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink"}
_O_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


@functools.lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _describe(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), f"not a regular file (mode {oct(stat.S_IFMT(mode))})")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _open_local(path: str, kind: str, limit: int, root: str | None, shown: str) -> tuple[int, int]:
    """(fd, size) of a checked regular file; raises Rejected."""
    real = path
    if root is not None:
        real_root = _real_root(root)
        real = os.path.realpath(path)
        if not _inside(real, real_root):
            raise Rejected("path_outside_root", f"{shown} links outside the source's root")
    try:
        fd = os.open(real, _O_FLAGS)
    except FileNotFoundError:
        raise Rejected("missing_media", f"{shown} not found") from None
    except OSError as err:
        if err.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, a FIFO opened oddly
            raise Rejected("not_a_file", f"{shown} is not a regular file ({err.strerror})") from None
        raise Rejected("unreadable_file", f"{shown} cannot be opened: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Rejected("missing_media", f"{shown} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not_a_file", f"{shown} is {_describe(st.st_mode)}, not a regular file")
        if root is not None:  # the file opened, not the name resolved a moment before
            with contextlib.suppress(OSError):
                opened = os.readlink(f"/proc/self/fd/{fd}")
                if not _inside(opened, _real_root(root)):
                    raise Rejected("path_outside_root", f"{shown} links outside the source's root")
        if st.st_size > limit:
            raise Rejected("file_too_large", f"{shown} is {_mib(st.st_size)}, over the {kind} "
                                             f"limit of {_mib(limit)} (limits.max_file_mb.{kind})")
        os.set_blocking(fd, True)
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def _check_remote(path: str, kind: str, limit: int, shown: str) -> int:
    fs, p = uri.fs_and_path(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        raise Rejected("missing_media", f"{shown} not found") from None
    if info.get("type") == "directory":
        raise Rejected("missing_media", f"{shown} is a folder, not a file")
    if info.get("type") not in ("file", None):
        raise Rejected("not_a_file", f"{shown} is a {info.get('type')}, not a file")
    size = int(info.get("size") or 0)
    if size > limit:
        raise Rejected("file_too_large", f"{shown} is {_mib(size)}, over the {kind} limit of "
                                         f"{_mib(limit)} (limits.max_file_mb.{kind})")
    return size


def _local(path: str) -> str | None:
    """The local path of `path`, None for a remote URI (cheaper than asking fsspec)."""
    if "://" not in path:
        return path
    return path[len("file://"):] if path.startswith("file://") else None


def _limit(kind: str, limits: FileLimits) -> int:
    if kind not in KINDS:
        raise ValueError(f"unknown file kind {kind!r}; one of {KINDS}")
    return limits.bytes(kind)


@contextlib.contextmanager
def open_guarded(path: str, kind: str, limits: FileLimits, root: str | None = None,
                 shown: str | None = None) -> Iterator[IO[bytes]]:
    """Open `path` (inside `root` unless None) for reading after the checks above; raises
    Rejected. Reading it whole is the caller's to bound (the readers read an element or a line
    at a time, each with its own limit)."""
    limit, shown = _limit(kind, limits), shown or path
    local = _local(path)
    if local is not None:
        fd, _ = _open_local(local, kind, limit, _local(root) if root else None, shown)
        f = os.fdopen(fd, "rb")
    else:
        _check_remote(path, kind, limit, shown)
        f = uri.open_read(path)
    with f:
        yield f


def read_guarded(path: str, kind: str, limits: FileLimits, root: str | None = None,
                 shown: str | None = None) -> bytes:
    """The whole file at `path`, checked as above, never more than its kind's limit."""
    limit, shown = _limit(kind, limits), shown or path
    local = _local(path)
    if local is not None:
        fd, size = _open_local(local, kind, limit, _local(root) if root else None, shown)
        with os.fdopen(fd, "rb", buffering=0) as f:
            data = f.read(size + 1) if size else b""
            if len(data) > size or not size:  # it grew since fstat (or reports 0, like /proc)
                data += f.read(limit + 1 - len(data))
    else:
        _check_remote(path, kind, limit, shown)
        with uri.open_read(path) as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise Rejected("file_too_large", f"{shown} grew past the {kind} limit of {_mib(limit)} "
                                         "while it was read")
    return data
