"""Media that lives inside a source's own files: parquet cells and tar members.

A record read from a parquet shard or a WebDataset tar does not carry its media bytes, and the
bytes are never written out beside the source: the record names them by a reference, and the
worker that transforms the record reads them from the file again.

- `parquet:<file>#rg<K>/row<R>/<column>/<item>`: row R of row group K, the cell of `column`,
  and in it the item'th image or audio of a list (`-` for a cell that holds one); a cell is
  binary, an HF `{bytes, path}` struct, or a list of either (`cell_media`).
- `tar:<file>#off<O>+<N>`: the N bytes at offset O of the tar (a member's data).

`<file>` is relative to the source's data root (storage.readbase.data_root). The planner (the
driver) then holds one partition of references, never a partition of images. Every file is
opened through the guarded open, inside the data root, and every item is checked against its
kind's size limit.

How a worker reads a partition's parquet media (its records' references come in row order):
- one file open at a time, its footer read once (`_File`); the tar of a WebDataset source is
  likewise kept open, and each member is one seek and one read;
- for the row group in hand, one forward cursor per column that the references name
  (`_Column`), a batch of rows at a time (`batch_rows`: at most BATCH_ROWS rows, fewer when the
  footer says the rows are big, so that a batch stays near BATCH_BYTES). pyarrow's
  pre-buffering is off: with it (pyarrow's default) the first batch fetches the whole column
  chunk of the row group; without it the chunk streams a page at a time through READ_BUFFER.
  A page is the smallest unit (a writer that puts a row group in one page makes it the
  row group; pyarrow writes a page per 1024 rows unless told `write_batch_size`);
- only the cells a reference names become Python objects: batches before the partition's
  first row in a row group (a range boundary inside it) are decoded, since parquet cannot seek
  to a row inside a page, but none of their cells is converted;
- the cursors close when the references move to another row group, so a partition whose rows
  lie in row groups K..L reads each of their media column chunks once, forward. A reference
  behind a cursor (never the case for a partition's rows in order) opens the column again.
`EmbeddedMedia.stats` counts what was read (files, row groups, column chunks, batches, cells,
tar members); `stats.opened` keeps the latest column chunks opened, for tests and benchmarks.

Why not Ray Data's read_parquet for the workers: its blocks are files or row groups that Ray
places and moves through the object store, while a build's partitions are fixed ranges of
inputs (range = shard.max_samples inputs, which is what makes shards byte-identical whatever the
number of workers) that the driver has already parsed, deduplicated and decided. Ranges do not
align with row groups, and every medium would cross the object store to reach the task that
writes its range. Reading the range's row groups where the range is written is the pyarrow read
Ray Data would make, without the copy and without a second scheduler beside the build's tasks.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from collections import deque
from dataclasses import dataclass, field, fields
from typing import IO, Any

from schemas.params import LimitsConfig
from schemas.rejects import Rejected
from storage import uri
from storage.guard import open_guarded

PARQUET, TAR = "parquet:", "tar:"
_PARQUET_REF = re.compile(r"^parquet:(.*?)#rg(\d+)/row(\d+)/(.*)/(-|\d+)$")
_TAR_REF = re.compile(r"^tar:(.*)#off(\d+)\+(\d+)$")
BATCH_ROWS = 32  # rows per parquet read at most: a batch of work for the driver
BATCH_BYTES = 64 << 20  # fewer rows when the footer says 32 would hold more than this
READ_BUFFER = 1 << 20  # parquet column chunks are streamed through this, not read whole
OPENED_KEPT = 4096  # column chunks remembered in ReadStats.opened (a long-lived worker's)


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


def batch_rows(meta: Any, rg: int, columns: list[str]) -> int:
    """Rows per batch for `columns` of row group `rg`: BATCH_ROWS, or fewer so that a batch
    holds about BATCH_BYTES by the footer's sizes (at least one row)."""
    rows = meta.row_group(rg).num_rows
    per_row = row_group_bytes(meta, rg, columns) / max(rows, 1)
    return max(1, min(BATCH_ROWS, int(BATCH_BYTES // per_row) if per_row else BATCH_ROWS))


def open_parquet(f: IO[bytes]) -> Any:
    """A pyarrow ParquetFile over an open file that streams its column chunks (no
    pre-buffering: see the module docstring)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False)


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


@dataclass
class ReadStats:
    """What an EmbeddedMedia has read, cumulative (`since` gives a difference)."""

    files: int = 0  # parquet or tar files opened
    row_groups: int = 0  # (file, row group) entered
    column_chunks: int = 0  # (file, row group, column) cursors opened
    batches: int = 0  # parquet batches read
    cells: int = 0  # parquet cells converted for a reference
    tar_members: int = 0  # tar members read
    # the latest column chunks opened, (file, row group, column), oldest first
    opened: deque[tuple[str, int, str]] = field(
        default_factory=lambda: deque(maxlen=OPENED_KEPT), repr=False)

    def counts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "opened"}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        return {k: v - before.get(k, 0) for k, v in self.counts().items()}


class _File:
    """An open source file (parquet or tar), with what identifies its version on disk."""

    def __init__(self, path: str, root: str, rel: str, limits: LimitsConfig,
                 parquet: bool) -> None:
        self.rel, self.path = rel, path
        self._stack = contextlib.ExitStack()
        try:
            self.f = self._stack.enter_context(open_guarded(path, "manifest", limits.max_file_mb,
                                                            root=root, shown=rel))
            self.ident = _ident(path)
            self.pf = open_parquet(self.f) if parquet else None
        except BaseException:
            self._stack.close()
            raise

    def current(self) -> bool:
        return self.ident == _ident(self.path)

    def close(self) -> None:
        self._stack.close()


class _Column:
    """One column of a row group of an open parquet file, read forward a batch at a time;
    only the cells asked for are converted."""

    def __init__(self, file: _File, rg: int, column: str, limits: LimitsConfig,
                 stats: ReadStats) -> None:
        pf, rel = file.pf, file.rel
        if rg >= pf.metadata.num_row_groups or column not in pf.schema_arrow.names:
            raise Rejected("missing_media", f"{rel} has no row group {rg} with column "
                                            f"{column!r}; was it rewritten since?")
        check_row_group(pf.metadata, rg, [column], limits)
        self.rows = pf.metadata.row_group(rg).num_rows
        self._batches = pf.iter_batches(batch_size=batch_rows(pf.metadata, rg, [column]),
                                        row_groups=[rg], columns=[column], use_threads=False)
        self.stats = stats
        self.start, self.array = 0, None  # the first row of the batch in hand, its column
        stats.column_chunks += 1
        stats.opened.append((rel, rg, column))

    def cell(self, row: int) -> Any:
        if row >= self.rows:
            raise Rejected("missing_media", f"row {row} is past the row group's {self.rows} rows")
        while self.array is None or row >= self.start + len(self.array):
            if self.array is not None:
                self.start += len(self.array)
            self.array = next(self._batches).column(0)
            self.stats.batches += 1
        self.stats.cells += 1
        return self.array[row - self.start].as_py()


class EmbeddedMedia:
    """The worker's reader of references into a source's files (one per source and process):
    it keeps one file and its row group's column cursors open and moves them forward."""

    def __init__(self, root: str, limits: LimitsConfig | None = None) -> None:
        self.root, self.limits = root, limits or LimitsConfig()
        self.stats = ReadStats()
        self._file: _File | None = None
        self._group: int | None = None  # the row group of `_columns`
        self._columns: dict[str, _Column] = {}

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

    def _open(self, rel: str, parquet: bool) -> _File:
        """The file `rel`, open (the one in hand unless it is another, or was rewritten)."""
        f = self._file
        if f is None or f.rel != rel or (f.pf is not None) != parquet or not f.current():
            self.close()
            f = self._file = _File(self._path(rel), self.root, rel, self.limits, parquet)
            self.stats.files += 1
        return f

    def _parquet(self, ref: str) -> bytes:
        m = _PARQUET_REF.match(ref)
        if m is None:
            raise Rejected("bad_media_field", f"malformed parquet reference {ref[:200]!r}")
        rel, rg, row, column, item = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), \
            m.group(5)
        f = self._open(rel, parquet=True)
        if self._group != rg:
            self._columns.clear()  # its generators hold no resources beyond the open file
            self._group = rg
            self.stats.row_groups += 1
        col = self._columns.get(column)
        if col is None or row < col.start:
            col = self._columns[column] = _Column(f, rg, column, self.limits, self.stats)
        try:
            cell = col.cell(row)
        except BaseException:
            del self._columns[column]  # a cursor that failed part-way is not reused
            raise
        media = cell_media(cell)
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
        f = self._open(rel, parquet=False).f
        f.seek(offset)
        data = f.read(size)
        self.stats.tar_members += 1
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
        self._columns.clear()
        self._group = None
        if self._file is not None:
            self._file.close()
            self._file = None
