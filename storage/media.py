"""Media references: resolve a record's relative path under its source's media root."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable

from schemas.rejects import Rejected
from storage import uri


def safe_relpath(rel: str) -> str:
    """Normalise a media path; refuse absolute paths and paths that climb out of the root."""
    if not rel or "\x00" in rel:
        raise Rejected("path_outside_root", f"empty or NUL-containing media path {rel!r}")
    if rel.startswith(("/", "\\")) or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise Rejected("path_outside_root", f"absolute media path {rel!r}")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise Rejected("path_outside_root", f"media path {rel!r} escapes the media root")
    return norm


def resolve(root: str, rel: str) -> str:
    """The full URI of `rel` under `root`; for local roots, symlinks may not lead outside either."""
    norm = safe_relpath(rel)
    full = uri.join(root, norm)
    if "://" not in root:
        real_root = os.path.realpath(root)
        real = os.path.realpath(full)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise Rejected("path_outside_root", f"media path {rel!r} links outside the media root")
    return full


def fetcher(root: str) -> Callable[[str], bytes]:
    """A function reading a record's media bytes, raising named rejections for bad paths."""

    def fetch(rel: str) -> bytes:
        full = resolve(root, rel)
        try:
            data = uri.read_bytes(full)
        except FileNotFoundError:
            raise Rejected("missing_media", f"{rel} not found under {root}") from None
        except IsADirectoryError:
            raise Rejected("missing_media", f"{rel} is a folder, not a file") from None
        if not data:
            raise Rejected("empty_file", f"{rel} has zero bytes")
        return data

    return fetch
