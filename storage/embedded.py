"""Media that lives inside a source's own files: parquet cells and tar members.

A record read from a parquet shard or a WebDataset tar does not carry its media bytes, and the
bytes are never written out beside the source: the record names them by a reference, and the
worker that transforms the record reads them from the file again.

- `parquet:<file>#rg<K>/row<R>/<column>/<item>`: row R of row group K, the cell of `column`,
  and in it the item'th image or audio of a list (`-` for a cell that holds one); a cell is
  binary, an HF `{bytes, path}` struct, or a list of either (`cell_media`).
- `tar:<file>#off<O>+<N>`: the N bytes at offset O of the tar (a member's data).

`<file>` is relative to the source's data root (storage.readbase.data_root). The planner (the
driver) then holds one partition of references, never a partition of images; a worker reads a
parquet row group column a batch at a time (`EmbeddedMedia` keeps its place, so a partition's
rows in order read each batch once) and a tar member with one seek. Every file is opened
through the guarded open, inside the data root, and every item is checked against its kind's
size limit.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from typing import Any

from schemas.params import LimitsConfig
from schemas.rejects import Rejected
from storage import uri
from storage.guard import open_guarded

PARQUET, TAR = "parquet:", "tar:"
_PARQUET_REF = re.compile(r"^parquet:(.*?)#rg(\d+)/row(\d+)/(.*)/(-|\d+)$")
_TAR_REF = re.compile(r"^tar:(.*)#off(\d+)\+(\d+)$")
BATCH_ROWS = 32  # rows per parquet read: a few MB of images, a batch of work for the driver
READ_BUFFER = 1 << 20  # parquet column chunks are streamed through this, not read whole


def parquet_ref(rel: str, rg: int, row: int, column: str, item: int | None) -> str:
    return f"{PARQUET}{rel}#rg{rg}/row{row}/{column}/{'-' if item is None else item}"


def tar_ref(rel: str, offset: int, size: int) -> str:
    return f"{TAR}{rel}#off{offset}+{size}"


def is_embedded(ref: str) -> bool:
    return ref.startswith((PARQUET, TAR))


def cell_media(cell: Any) -> list[tuple[bytes | None, str | None]]:
    """(bytes, path) of each medium in a parquet cell: binary, an HF `{bytes, path}` struct,
    or a list of either; a null cell holds none, a null element is (None, None)."""
    if cell is None:
        return []
    if isinstance(cell, list):
        return [m for c in cell for m in (cell_media(c) or [(None, None)])]
    if isinstance(cell, bytes | bytearray | memoryview):
        return [(bytes(cell), None)]
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is not None and not isinstance(data, bytes | bytearray):
            raise Rejected("bad_media_field", f"a media struct's `bytes` is a "
                                              f"{type(data).__name__}")
        if path is not None and not isinstance(path, str):
            raise Rejected("bad_media_field", f"a media struct's `path` is a {type(path).__name__}")
        return [(bytes(data) if data is not None else None, path or None)]
    raise Rejected("bad_media_field", f"a media cell holds a {type(cell).__name__}, not bytes, "
                                      "a {bytes, path} struct or a list of them")


def row_group_bytes(meta: Any, rg: int, columns: list[str]) -> int:
    """The uncompressed size the footer states for `columns` of row group `rg`."""
    g = meta.row_group(rg)
    total = 0
    for i in range(g.num_columns):
        c = g.column(i)
        if c.path_in_schema.split(".", 1)[0] in columns:
            total += c.total_uncompressed_size
    return total


def check_row_group(meta: Any, rg: int, columns: list[str], limits: LimitsConfig) -> None:
    size, limit = row_group_bytes(meta, rg, columns), int(limits.parquet_max_row_group_mb * 2**20)
    if size > limit:
        raise Rejected("row_group_too_large", f"row group {rg} holds {size / 2**20:.1f} MiB "
                                              f"uncompressed, over limits.parquet_max_row_group_mb "
                                              f"({limits.parquet_max_row_group_mb})")


def _ident(path: str) -> tuple[int, int] | None:
    """(size, mtime) of a local file, to see that it was not rewritten under an open cursor
    (a worker outlives a build: the next build's rows must come from the file as it is)."""
    if "://" in path and not path.startswith("file://"):
        return None
    try:
        st = os.stat(path.removeprefix("file://"))
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class _Cursor:
    """A parquet file's row group column, read forward a batch at a time."""

    def __init__(self, path: str, root: str, rel: str, rg: int, column: str,
                 limits: LimitsConfig) -> None:
        import pyarrow.parquet as pq

        self.key = (rel, rg, column)
        self.path = path
        self._stack = contextlib.ExitStack()
        try:
            f = self._stack.enter_context(open_guarded(path, "manifest", limits.max_file_mb,
                                                       root=root, shown=rel))
            self.ident = _ident(path)
            pf = pq.ParquetFile(f, buffer_size=READ_BUFFER)
            if rg >= pf.metadata.num_row_groups or column not in pf.schema_arrow.names:
                raise Rejected("missing_media", f"{rel} has no row group {rg} with column "
                                                f"{column!r}; was it rewritten since?")
            check_row_group(pf.metadata, rg, [column], limits)
            self.rows = pf.metadata.row_group(rg).num_rows
            self._batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg],
                                            columns=[column], use_threads=False)
        except BaseException:
            self._stack.close()
            raise
        self.start, self.cells = 0, []  # the rows of the batch in hand

    def cell(self, row: int) -> Any:
        if row >= self.rows:
            raise Rejected("missing_media", f"row {row} is past the row group's {self.rows} rows")
        while row >= self.start + len(self.cells):
            self.start += len(self.cells)
            self.cells = next(self._batches).column(0).to_pylist()
        return self.cells[row - self.start]

    def close(self) -> None:
        self._stack.close()


class EmbeddedMedia:
    """The worker's reader of references into a source's files (one per source and process):
    it keeps one parquet cursor open and moves it forward, reopening only to go back."""

    def __init__(self, root: str, limits: LimitsConfig | None = None) -> None:
        self.root, self.limits = root, limits or LimitsConfig()
        self._cursor: _Cursor | None = None

    def handles(self, ref: str) -> bool:
        return is_embedded(ref)

    def read(self, ref: str, kind: str) -> bytes:
        if ref.startswith(PARQUET):
            data = self._parquet(ref)
        elif ref.startswith(TAR):
            data = self._tar(ref)
        else:
            raise ValueError(f"not an embedded media reference: {ref[:80]!r}")
        limit = self.limits.max_file_mb.bytes(kind)
        if len(data) > limit:
            raise Rejected("file_too_large", f"{ref[:200]} is {len(data) / 2**20:.1f} MiB, over "
                                             f"the {kind} limit (limits.max_file_mb.{kind})")
        if not data:
            raise Rejected("empty_file", f"{ref[:200]} has zero bytes")
        return data

    def _parquet(self, ref: str) -> bytes:
        m = _PARQUET_REF.match(ref)
        if m is None:
            raise Rejected("bad_media_field", f"malformed parquet reference {ref[:200]!r}")
        rel, rg, row, column, item = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), \
            m.group(5)
        key = (rel, rg, column)
        cur = self._cursor
        if cur is None or cur.key != key or row < cur.start or cur.ident != _ident(cur.path):
            self.close()
            cur = self._cursor = _Cursor(self._path(rel), self.root, rel, rg, column, self.limits)
        media = cell_media(cur.cell(row))
        i = 0 if item == "-" else int(item)
        if i >= len(media) or media[i][0] is None:
            raise Rejected("null_media", f"{ref[:200]}: no bytes in the cell")
        data = media[i][0]
        assert data is not None
        return data

    def _tar(self, ref: str) -> bytes:
        m = _TAR_REF.match(ref)
        if m is None:
            raise Rejected("bad_media_field", f"malformed tar reference {ref[:200]!r}")
        rel, offset, size = m.group(1), int(m.group(2)), int(m.group(3))
        if size > max(self.limits.max_file_mb.bytes(k) for k in ("image", "video", "audio")):
            raise Rejected("file_too_large", f"{rel} member at {offset} is {size:,} bytes")
        with open_guarded(self._path(rel), "manifest", self.limits.max_file_mb, root=self.root,
                          shown=rel) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise Rejected("missing_media", f"{rel} ends before the member at {offset} "
                                            f"({len(data)} of {size} bytes); rewritten since?")
        return data

    def _path(self, rel: str) -> str:
        if not rel or "\x00" in rel or rel.startswith(("/", "\\")) or "://" in rel:
            raise Rejected("path_outside_root", f"absolute file in a reference: {rel[:200]!r}")
        norm = posixpath.normpath(rel.replace("\\", "/"))
        if norm == ".." or norm.startswith("../"):
            raise Rejected("path_outside_root", f"reference {rel[:200]!r} escapes the data root")
        return uri.join(self.root, norm)

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
