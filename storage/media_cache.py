"""A content-addressed cache of transformed media: an entry per (medium's content hash,
transform parameters), under OUT/cache/media/ by default, shared by every worker of a build and
by later builds into the same OUT (or any folder or URI `dedupe.cache` names).

An entry is a few blobs (the tiles of an image) and a JSON header, written under a temporary
name and renamed into place: several workers that tile the same image at once each write the
same bytes, and a reader sees a whole entry or none. The header carries the payload's sha256,
so an entry damaged on disk reads as a miss (and is written again) instead of as tiles.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from storage import uri

MAGIC = b"VCMC1\n"


def entry_key(content_sha256: str, kind: str, params: dict[str, Any]) -> str:
    """The entry of a medium's bytes under one set of transform parameters."""
    blob = json.dumps({"sha256": content_sha256, "kind": kind, "params": params},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def pack(blobs: list[bytes], meta: dict[str, Any]) -> bytes:
    payload = b"".join(blobs)
    head = json.dumps({"meta": meta, "sizes": [len(b) for b in blobs],
                       "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    return MAGIC + len(head).to_bytes(4, "little") + head + payload


def unpack(data: bytes) -> tuple[list[bytes], dict[str, Any]] | None:
    """The entry's blobs and meta, or None when it is not a whole entry."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        return None
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    try:
        head = json.loads(data[start:start + n])
    except ValueError:
        return None
    payload = data[start + n:]
    if hashlib.sha256(payload).hexdigest() != head.get("sha256"):
        return None
    blobs, pos = [], 0
    for size in head["sizes"]:
        blobs.append(payload[pos:pos + size])
        pos += size
    return blobs, head["meta"]


class MediaCache:
    """get/put of entries under `folder`; counts its hits and misses."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        return uri.join(self.folder, key[:2], f"{key}.bin")

    def get(self, key: str) -> tuple[list[bytes], dict[str, Any]] | None:
        path = self.path(key)
        try:
            got = unpack(uri.read_bytes(path))
        except FileNotFoundError:
            got = None
        if got is None:
            self.misses += 1
        else:
            self.hits += 1
        return got

    def put(self, key: str, blobs: list[bytes], meta: dict[str, Any]) -> None:
        uri.write_bytes_atomic(self.path(key), pack(blobs, meta))
