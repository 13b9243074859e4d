"""What every reader shares: the Item an input becomes, the source's data root, JSON values
through the bounded stream, ids, languages, the ASR record, and the folder walk. The readers
(storage.readers and the storage.read_* modules of the newer layouts) import this; it imports
none of them.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from schemas.config import SourceConfig
from schemas.params import LimitsConfig
from schemas.record import Record, parse_record
from schemas.rejects import Rejected
from schemas.text import detect_language
from storage import uri
from storage.guard import open_guarded
from storage.jsonstream import RawValue, iter_json_array, iter_json_lines


@dataclass
class Item:
    """One input of a source: its position, where it came from, and what it became."""

    index: int
    lineage: str
    raw: str
    record: Record | None = None
    error: Rejected | None = None
    record_id: str | None = None
    # Read light (read_source(light=True)): the record surely parses, and is left unbuilt for the
    # worker to make from `raw` (storage.readers.parse_input); record_id is its id.
    light: bool = False


def data_root(src: SourceConfig) -> str:
    """The folder a source's own files lie in (and embedded media references are relative
    to): the path itself for a folder source, else the folder of the file or pattern."""
    from schemas.config import pattern_base

    if src.format in ("librispeech", "aishell", "transcript_dir"):
        return src.path
    if src.format in ("parquet", "webdataset"):
        base = pattern_base(src.path)
        if base != src.path:
            return base.rstrip("/") or "/"
        if uri.fs_and_path(src.path)[0].isdir(uri.fs_and_path(src.path)[1]):
            return src.path
    return posixpath.dirname(src.path) if "://" in src.path else os.path.dirname(src.path)


def _internal(err: BaseException, src: SourceConfig, index: int, what: str = "") -> Rejected:
    msg = str(err).splitlines()[0][:300] if str(err) else ""
    return Rejected("internal_error", f"{what}{type(err).__name__}: {msg} (source {src.name!r}, "
                                      f"input {index})")


def _values(src: SourceConfig, limits: LimitsConfig) -> Iterator[RawValue]:
    depth, chars = limits.json_max_depth, int(limits.json_max_element_mb * 2**20)
    try:
        with open_guarded(src.path, "manifest", limits.max_file_mb) as f:
            if src.path.endswith(".jsonl"):
                yield from iter_json_lines(f, depth, chars)
            else:
                yield from iter_json_array(f, max_depth=depth, max_chars=chars)
    except Rejected as err:  # the file itself (the guard): one input
        yield RawValue(0, "file", "", error=err)


def _lineage(src: SourceConfig, where: str) -> str:
    return f"{posixpath.basename(src.path.rstrip('/'))}:{where}"


def _language(src: SourceConfig, text: str, given: Any = None) -> str:
    if isinstance(given, str) and given:
        return given
    return detect_language(text) if src.language == "auto" else src.language


def _items(src: SourceConfig, start: int, values: Iterator[RawValue],
           make: Callable[[RawValue, str], tuple[str, Record]],
           prove: Callable[[RawValue], str | None] | None = None) -> Iterator[Item]:
    """Items from parsed values: unparsed below `start`, else a record from `make` or a reason
    (`internal_error` for what `make` did not foresee). With `prove` (a light read), a value it
    gives an id for is a light item: `make` would succeed on it, and is left to the worker."""
    at = _lineage(src, "")  # the file's part of every lineage
    for rv in values:
        if rv.index < start:
            yield Item(rv.index, "", rv.raw)
            continue
        if prove is not None and rv.error is None:
            try:
                rid = prove(rv)
            except Exception:  # noqa: BLE001 - not proven: the full parse decides
                rid = None
            if rid is not None:
                yield Item(rv.index, at + rv.where, rv.raw, record_id=rid, light=True)
                continue
        yield make_item(src, rv, at + rv.where, make)


@contextmanager
def rejects_into(item: Item, src: SourceConfig, utf8: bool = False) -> Iterator[None]:
    """Make an input's record inside this block: a Rejected becomes the item's reject, anything
    unforeseen its `internal_error` (never the build's); with `utf8`, a UnicodeDecodeError is
    `invalid_utf8` at its offset."""
    try:
        yield
    except UnicodeDecodeError as exc:
        item.error = (Rejected("invalid_utf8", f"invalid byte at offset {exc.start}") if utf8
                      else _internal(exc, src, item.index, f"{item.lineage}: "))
    except Rejected as err:
        item.error = err
    except Exception as err:  # noqa: BLE001 - the input's reject says what it was
        item.error = _internal(err, src, item.index, f"{item.lineage}: ")


def make_item(src: SourceConfig, rv: RawValue, lineage: str,
              make: Callable[[RawValue, str], tuple[str, Record]]) -> Item:
    """The item of one value: its record from `make`, or the reason it has none. The driver's
    read and the worker's (storage.readers.parse_input) both go through here, so a reject
    reads the same wherever it was found."""
    item = Item(rv.index, lineage, rv.raw, error=rv.error)
    if rv.error is None:
        try:
            item.record_id, item.record = make(rv, item.lineage)
        except Rejected as err:
            item.error = err
            item.record_id = _raw_id(src, rv)  # the reject line names the record
        except Exception as err:  # noqa: BLE001 - the input's reject says what it was
            item.error = _internal(err, src, rv.index, f"parsing {rv.where}: ")
            item.record = None
            try:
                item.record_id = _raw_id(src, rv)
            except Exception:  # noqa: BLE001
                item.record_id = None
    return item


def _raw_id(src: SourceConfig, rv: RawValue) -> str | None:
    """The id a parsed value has (or would be given), None when it is not an object."""
    v = rv.value
    if not isinstance(v, dict):
        return None
    rid = v.get("id")
    return f"{src.name}_{rv.index:08d}" if rid is None or rid == "" else str(rid)


def _line_error(line: bytes, size: int, limits: LimitsConfig) -> Rejected | None:
    if size > len(line):
        return Rejected("element_too_large", f"the line is {size:,} bytes > "
                                             f"{int(limits.json_max_element_mb * 2**20):,} "
                                             "(limits.json_max_element_mb); the reader went on "
                                             "after it")
    return None


def check_kind_media(src: SourceConfig, rec: Record) -> None:
    """A video source's records hold a video; a text source's hold no media."""
    media = rec.media()
    if src.kind == "video" and not media["video"]:
        raise Rejected("bad_media_field", "a record of a video source has no `video`")
    if src.kind == "text" and any(media.values()):
        raise Rejected("bad_media_field", "a record of a text source has media attached")


def asr_record(src: SourceConfig, rid: str, audio: str, text: str, lineage: str,
               language: Any = None) -> Record:
    if not text.strip():
        raise Rejected("missing_text", f"record {rid!r} has an empty transcript")
    return parse_record({
        "id": rid,
        "set": src.name,
        "audio": [audio],
        "conversations": [
            {"from": "human", "value": f"<audio>\n{src.asr_prompt}"},
            {"from": "gpt", "value": text.strip()},
        ],
        "meta": {
            "task": "asr",
            "source": src.name,
            "lineage": lineage,
            "language": _language(src, text, language),
            "licence": src.licence,
        },
    })


_TRANS_LINE = re.compile(r"^(\S+)[ \t]+(.*)$")


def transcript_fields(line: bytes, item: Item) -> tuple[str, str]:
    """(utterance id, transcript) of an `ID text` transcript line, the id set on `item` (so a
    reject names it); `missing_text` when nothing follows the id. Invalid UTF-8 raises
    UnicodeDecodeError for the caller to reject."""
    text_line = line.decode("utf-8").strip()
    m = _TRANS_LINE.match(text_line)
    if m is None:
        item.record_id = text_line.split()[0] if text_line.split() else None
        raise Rejected("missing_text", f"no transcript after the id: {text_line!r}")
    item.record_id = m.group(1)
    return m.group(1), m.group(2)


def find_files(root: str, wanted: Callable[[str], bool]) -> list[str]:
    """The files under `root` whose base name is `wanted`, sorted, as paths or URIs. Locally,
    folders are walked without following a symlinked folder out of the root or in a loop
    (a file link is the guarded open's to judge)."""
    fs, base = uri.fs_and_path(root)
    if "://" in root and not root.startswith("file://"):
        return sorted(p if "://" in p else uri.join(root, posixpath.relpath(p, base))
                      for p in fs.find(base) if wanted(posixpath.basename(p)))
    real_root = os.path.realpath(base)
    seen, found = set(), []
    for folder, dirs, files in os.walk(base, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or not (real == real_root or real.startswith(real_root + os.sep)):
            dirs[:] = []  # a loop, or a folder linked in from outside: not descended
            continue
        seen.add(real)
        dirs.sort()
        found += [os.path.join(folder, n) for n in files if wanted(n)]
    return sorted(found)
