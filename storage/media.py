"""Media references: resolve a record's relative path under its source's media root, and read
it through the guarded open (storage.guard)."""

from __future__ import annotations

import os
import posixpath
from typing import Protocol

from schemas.params import FileLimits
from schemas.rejects import Rejected
from storage import uri
from storage.guard import read_guarded


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
    """The full URI of `rel` under `root`; for local roots, symlinks may not lead outside either
    (the guarded open checks the file it opens again)."""
    norm = safe_relpath(rel)
    full = uri.join(root, norm)
    if "://" not in root:
        real_root = os.path.realpath(root)
        real = os.path.realpath(full)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise Rejected("path_outside_root", f"media path {rel!r} links outside the media root")
    return full


class Fetch(Protocol):
    def __call__(self, rel: str, kind: str = "image") -> bytes: ...


class Embedded(Protocol):
    """Media inside a source's own files (storage.embedded.EmbeddedMedia)."""

    def handles(self, ref: str) -> bool: ...

    def read(self, ref: str, kind: str) -> bytes: ...


def fetcher(root: str, limits: FileLimits | None = None,
            embedded: Embedded | None = None) -> Fetch:
    """A function reading a record's media bytes (`kind`: image, video or audio, for its size
    limit), raising named rejections for bad paths and files. With `embedded` (a parquet or
    WebDataset source), references into the source's files are read through it."""
    limits = limits or FileLimits()

    def fetch(rel: str, kind: str = "image") -> bytes:
        if embedded is not None and embedded.handles(rel):
            return embedded.read(rel, kind)
        full = uri.join(root, safe_relpath(rel))
        data = read_guarded(full, kind, limits, root=root, shown=rel)
        if not data:
            raise Rejected("empty_file", f"{rel} has zero bytes")
        return data

    return fetch
