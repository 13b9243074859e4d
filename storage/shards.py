"""WebDataset tar shards: a deterministic writer and a streaming reader.

The writer emits POSIX tar (PAX headers for long names) with fixed owner, mode and mtime, so
the same samples always give the same bytes; it hashes while writing, so the sha256 in the
manifest costs no second read. Members of one sample are contiguous and start with KEY.json;
keys hold no dots, because WebDataset splits a member name at the first dot of its basename.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterator
from typing import IO

from storage import uri

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile's default record size: the archive is padded to a multiple
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY = 150


def sample_key(source: str, record_id: str) -> str:
    """A WebDataset key for a record: no dots, no slashes, bounded length, stable.

    When sanitizing changes the id (a `/`, a space, a dot, a non-ASCII character) or it has to
    be cut, the key keeps a short hash of the original, so two different ids never share a
    key (`a/b` and `a_b` give different keys); an id that is already a valid key is kept as is.
    """
    raw = f"{source}-{record_id}"
    key = _KEY_BAD.sub("_", raw)
    if key == raw and len(key) <= MAX_KEY:
        return key
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{key[: MAX_KEY - 13]}_{digest}"


class _HashingFile:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)


class TarShardWriter:
    """Write samples to `target` atomically: the tar appears under its name only on close()."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._file = uri.AtomicFile(target)
        self._out = _HashingFile(self._file.file)
        self.count = 0

    def write_sample(self, key: str, members: list[tuple[str, bytes]]) -> int:
        """Append one sample; members are (suffix, bytes). Returns the bytes written."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        start = self._out.n
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            self._out.write(data)
            pad = -len(data) % _BLOCK
            if pad:
                self._out.write(b"\0" * pad)
        self.count += 1
        return self._out.n - start

    @property
    def bytes_written(self) -> int:
        return self._out.n

    def close(self) -> tuple[int, str]:
        """Finish the archive and rename it into place; return (size, sha256)."""
        end = self._out.n + 2 * _BLOCK
        self._out.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
        self._file.commit()
        return self._out.n, self._out.h.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file; nothing appears under the shard's name."""
        self._file.discard()


def iter_samples(shard_uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {suffix: bytes}) from a shard, grouping contiguous members by key."""
    with uri.open_read(shard_uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key, group = None, {}
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, suffix = base.partition(".")
            data = tar.extractfile(m).read()
            if k != key and key is not None:
                yield key, group
                group = {}
            key = k
            group[suffix] = data
        if key is not None:
            yield key, group


def sha256_of(file_uri: str, chunk: int = 1 << 20) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with uri.open_read(file_uri) as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()
