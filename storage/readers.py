"""Ingest adapters: read a source in its own format and yield VITA records, one per input.

Every input yields exactly one Item: a Record, or the Rejected reason it could not be one.
Inputs are streamed; nothing reads a whole file into memory, and nothing holds more of one
input than the limits allow (schemas.params.LimitsConfig). Every file is opened through the
guarded open (storage.guard): the source's own file, and every transcript found under a
LibriSpeech root, which must lie inside that root. A file that cannot be read is one reject
(`not_a_file`, `file_too_large`, `path_outside_root`, ...), and the reader goes on with the next
file. What a reader did not foresee becomes that input's `internal_error`, never the build's.

Formats:
- `llava`: LLaVA / ShareGPT4V JSON, a list of {id, image|video, conversations} (or *.jsonl);
- `vita`: VITA's own JSON, the same plus `set`, `image` as str or list, `audio` list;
- `asr_jsonl`: JSON Lines of {"audio": path, "text": transcript[, "id", "language"]};
- `librispeech`: folders with `*.trans.txt` ("UTT-ID transcript" lines) beside `UTT-ID.flac`;
- `messages`: OpenAI-style chat records (storage.read_messages);
- `aishell`, `transcript_dir`: an `id text` file beside a tree of audio (storage.read_transcripts);
- `parquet`: shards with the media in their rows (storage.read_parquet);
- `webdataset`: img2dataset / video2dataset tars (storage.read_webdataset).
The last two leave their media where they are: a record names it by a reference into its file
(storage.embedded), which the worker reads.

A light read (`read_source(light=True)`, what the build's planner does when no content decision
needs the record) does not build the records of `LIGHT_FORMATS` that surely parse: a value or
line that a cheap check proves `make` would accept (the same id, no reject, a record that
serialises) comes back as a light item, its raw text and id, and the worker builds the record
from the raw with `parse_input`, the same make function. What the check does not prove (a
reject, an unusual shape) is parsed here as in a full read, so the planner still knows, for
every input, whether it is a record: the duplicate-id decision needs that (a rejected input
does not claim its id).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from typing import Any

from schemas.config import SourceConfig
from schemas.params import LimitsConfig
from schemas.record import _PLACEHOLDER_RE as PLACEHOLDER  # the schema's own count
from schemas.record import Record, parse_record
from schemas.rejects import Rejected
from storage import uri
from storage.guard import open_guarded
from storage.jsonstream import RawValue, iter_lines
from storage.readbase import (  # noqa: F401 - data_root, find_files: this module's API too
    Item,
    _internal,
    _items,
    _language,
    _line_error,
    _lineage,
    _raw_id,
    _values,
    asr_record,
    check_kind_media,
    data_root,
    find_files,
    make_item,
    rejects_into,
    transcript_fields,
)

_RECORD_FIELDS = {"id", "set", "image", "video", "audio", "conversations"}
# Formats a light read leaves the records of to the worker (the others are parsed as ever).
LIGHT_FORMATS = ("llava", "vita", "asr_jsonl", "text_lines")
# A JSON escape of a UTF-16 surrogate: a lone one would not serialise; such values are parsed.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape keeps it


def default_media_root(src: SourceConfig) -> str:
    if src.media_root is not None:
        return src.media_root
    return data_root(src)


def read_source(src: SourceConfig, start: int = 0, limits: LimitsConfig | None = None,
                light: bool = False) -> Iterator[Item]:
    """Yield every input of `src` from index `start` on (earlier ones are read, not parsed).
    `light`: records of LIGHT_FORMATS that surely parse are left unbuilt (Item.light)."""
    limits = limits or LimitsConfig()
    if src.format in ("llava", "vita"):
        items = _conversation_items(src, start, limits, light)
    elif src.format == "asr_jsonl":
        items = _asr_jsonl_items(src, start, limits, light)
    elif src.format == "librispeech":
        items = _librispeech_items(src, start, limits)
    elif src.format == "text_lines":
        items = _text_line_items(src, start, limits, light)
    elif src.format == "messages":
        from storage.read_messages import message_items

        items = message_items(src, start, limits)
    elif src.format in ("aishell", "transcript_dir"):
        from storage.read_transcripts import transcript_dir_items

        items = transcript_dir_items(src, start, limits)
    elif src.format == "parquet":
        from storage.read_parquet import parquet_items

        items = parquet_items(src, start, limits)
    elif src.format == "webdataset":
        from storage.read_webdataset import webdataset_items

        items = webdataset_items(src, start, limits)
    else:  # the config schema refuses other formats
        raise ValueError(f"unknown format {src.format!r}")
    yield from _contained(src, items)


def _contained(src: SourceConfig, items: Iterator[Item]) -> Iterator[Item]:
    """The items, and when reading itself fails unexpectedly (a reader bug, an I/O error in the
    middle of a file), one `internal_error` input for the rest of the file, so that the build
    goes on with the next source and says what happened."""
    index = -1
    try:
        for item in items:
            index = item.index
            yield item
    except Exception as err:  # noqa: BLE001 - becomes the input's reject
        rest = Item(index + 1, _lineage(src, f"after input {index}"), "")
        rest.error = _internal(err, src, index + 1, "reading the rest of the file failed; ")
        yield rest


def _file_reject(src: SourceConfig, index: int, where: str, err: Rejected) -> Item:
    """A file that cannot be read: one input, rejected with the guard's reason."""
    return Item(index, _lineage(src, where), "", error=err)


def parse_input(src: SourceConfig, raw: str, index: int, lineage: str) -> Item:
    """The item a light item of `src` stands for, made from its raw text with the make function
    of a full read (what the worker runs): the same record, or the same reject."""
    where = lineage.rsplit(":", 1)[-1]
    if src.format == "text_lines":
        item = Item(index, lineage, raw, record_id=f"{src.name}_{index:08d}")
        try:  # the line's text less its end, which neither the record nor its language sees
            item.record = tts_pair_record(src, item.record_id, raw, lineage)
        except Rejected as err:
            item.error = err
        except Exception as err:  # noqa: BLE001
            item.error = _internal(err, src, index, f"{where}: ")
        return item
    if src.format in ("llava", "vita"):
        make = _conversation_make(src)
    elif src.format == "asr_jsonl":
        make = _asr_make(src)
    else:
        raise ValueError(f"format {src.format!r} is not read light (LIGHT_FORMATS)")
    return make_item(src, RawValue(index, where, raw, json.loads(raw)), lineage, make)


def _conversation_make(src: SourceConfig):  # noqa: ANN202 - _items' make
    def make(rv: RawValue, lineage: str) -> tuple[str, Record]:
        rid, rec = _conversation_record(src, rv)
        if src.kind == "tts_pair":  # the text to speak is the first answer
            answer = next((t.value for t in rec.conversations if t.from_ == "gpt"), "")
            rec = tts_pair_record(src, rid, answer, lineage, rec.meta.language)
        return rid, rec

    return make


def _conversation_items(src: SourceConfig, start: int, limits: LimitsConfig,
                        light: bool = False) -> Iterator[Item]:
    prove = (lambda rv: _conversation_proof(src, rv)) if light else None
    yield from _items(src, start, _values(src, limits), _conversation_make(src), prove)


def _media_count(value: Any, kind: str) -> int:
    """How many media a record's `kind` field names (as Record.media counts them), -1 for a
    value the schema refuses."""
    if value is None:
        return 0
    if kind != "audio" and type(value) is str:
        return 1 if kind == "image" or value else 0  # `video: ""` is no video
    if kind != "video" and type(value) is list and all(type(p) is str for p in value):
        return len(value)
    return -1


def _conversation_proof(src: SourceConfig, rv: RawValue) -> str | None:
    """The record's id when `_conversation_record` surely accepts the value and its record
    serialises; None when only the full parse can say. What it proves, the schema checks too:
    the turns (schemas.contract.turn_problem), the media fields' types, one placeholder per
    medium, a source kind's media, no lone surrogate."""
    v = rv.value
    if type(v) is not dict or src.kind == "tts_pair" or "\\u" in rv.raw and \
            _SURROGATE_ESCAPE.search(rv.raw):
        return None
    turns = v.get("conversations")
    if type(turns) is not list or not turns or len(turns) % 2:
        return None
    placed = {"image": 0, "video": 0, "audio": 0}
    want, other = "human", "gpt"
    for t in turns:  # human first, alternating, ending with gpt (even), each with text
        if type(t) is not dict or len(t) != 2 or t.get("from") != want:
            return None
        value = t.get("value")
        if type(value) is not str or not value.strip():
            return None
        if "<" in value:
            for m in PLACEHOLDER.finditer(value):
                placed[m.group(1)] += 1
        want, other = other, want
    if "image" in v or "video" in v or "audio" in v:
        media = {k: _media_count(v.get(k), k) for k in placed}
    else:
        media = {"image": 0, "video": 0, "audio": 0}
    if media != placed:
        return None
    if (src.kind == "video" and not media["video"]) or (src.kind == "text" and any(media.values())):
        return None
    return _raw_id(src, rv)


def tts_pair_record(src: SourceConfig, rid: str, text: str, lineage: str,
                    language: Any = None) -> Record:
    """A stage-3 pair before synthesis: the text, and `<audio>` for the speech to come."""
    if not text.strip():
        raise Rejected("empty_text", f"record {rid!r} has no text to speak")
    return parse_record({
        "id": rid, "set": src.name, "audio": ["tts/pending.flac"],
        "conversations": [{"from": "human", "value": text.strip()},
                          {"from": "gpt", "value": "<audio>"}],
        "meta": {"task": "tts_pair", "source": src.name, "lineage": lineage,
                 "language": _language(src, text, language), "licence": src.licence},
    })


def _text_line_items(src: SourceConfig, start: int, limits: LimitsConfig, light: bool = False
                     ) -> Iterator[Item]:
    """One utterance per non-blank line of a text file."""
    index = 0
    try:
        with open_guarded(src.path, "manifest", limits.max_file_mb) as f:
            for lineno, line, size in iter_lines(f, int(limits.json_max_element_mb * 2**20)):
                if size == len(line) and not line.strip():
                    continue
                raw = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
                if index >= start:
                    item = Item(index, _lineage(src, f"line {lineno}"), raw)
                    item.record_id = f"{src.name}_{index:08d}"
                    item.error = _line_error(line, size, limits)
                    if item.error is None and light and raw.strip() and \
                            PLACEHOLDER.search(raw) is None and _BAD_BYTE.search(raw) is None:
                        item.light = True  # valid UTF-8 with text surely makes a record
                    elif item.error is None:
                        try:
                            text = line.decode("utf-8")
                            item.record = tts_pair_record(src, item.record_id, text, item.lineage)
                        except UnicodeDecodeError as exc:
                            item.error = Rejected("invalid_utf8", f"invalid byte at offset {exc.start}")
                        except Rejected as err:
                            item.error = err
                        except Exception as err:  # noqa: BLE001
                            item.error = _internal(err, src, index, f"line {lineno}: ")
                    yield item
                else:
                    yield Item(index, "", raw)
                index += 1
    except Rejected as err:  # the file itself (the guard): one input
        if index >= start:
            yield _file_reject(src, index, "file", err)


def _conversation_record(src: SourceConfig, rv: RawValue) -> tuple[str, Record]:
    v = rv.value
    if not isinstance(v, dict):
        raise Rejected("not_an_object", f"got a JSON {type(v).__name__}")
    rid = _raw_id(src, rv)
    assert rid is not None
    if "conversations" not in v:
        raise Rejected("missing_conversations", f"record {rid!r} has keys {sorted(v)[:10]}")
    extra = {k: val for k, val in v.items() if k not in _RECORD_FIELDS}
    data: dict[str, Any] = {k: v[k] for k in _RECORD_FIELDS if k in v and v[k] is not None}
    data["id"] = rid
    data["set"] = str(v["set"]) if src.format == "vita" and v.get("set") else src.name
    text = _turn_text(v["conversations"])
    meta: dict[str, Any] = {
        "task": src.kind,
        "source": src.name,
        "lineage": _lineage(src, rv.where),
        "language": _language(src, text),
        "licence": src.licence,
    }
    if extra:
        meta["source_fields"] = extra  # kept, not lost: fields VITA's format does not name
    data["meta"] = meta
    rec = parse_record(data)
    check_kind_media(src, rec)
    return rid, rec


def _turn_text(conversations: Any) -> str:
    if not isinstance(conversations, list):
        return ""
    return "\n".join(t["value"] for t in conversations
                     if isinstance(t, dict) and isinstance(t.get("value"), str))


def _asr_make(src: SourceConfig):  # noqa: ANN202 - _items' make
    return lambda rv, lineage: _asr_from_value(src, rv, lineage)


def _asr_jsonl_items(src: SourceConfig, start: int, limits: LimitsConfig, light: bool = False
                     ) -> Iterator[Item]:
    prove = (lambda rv: _asr_proof(src, rv)) if light else None
    yield from _items(src, start, _values(src, limits), _asr_make(src), prove)


def _asr_proof(src: SourceConfig, rv: RawValue) -> str | None:
    """The record's id when `_asr_from_value` surely accepts the value (as _conversation_proof)."""
    v = rv.value
    if type(v) is not dict or "\\u" in rv.raw and _SURROGATE_ESCAPE.search(rv.raw):
        return None
    audio, text = v.get("audio"), v.get("text")
    if type(audio) is not str or not audio or type(text) is not str or not text.strip():
        return None
    if PLACEHOLDER.search(text) or PLACEHOLDER.search(src.asr_prompt):
        return None
    return _raw_id(src, rv)


def _asr_from_value(src: SourceConfig, rv: RawValue, lineage: str) -> tuple[str, Record]:
    v = rv.value
    if not isinstance(v, dict):
        raise Rejected("not_an_object", f"got a JSON {type(v).__name__}")
    audio, text = v.get("audio"), v.get("text")
    if not isinstance(audio, str) or not audio:
        raise Rejected("bad_media_field", "`audio` must be a path string")
    if not isinstance(text, str):
        raise Rejected("missing_text", "`text` must be a string")
    rid = _raw_id(src, rv)
    assert rid is not None
    return rid, asr_record(src, rid, audio, text, lineage, v.get("language"))


def transcripts(root: str) -> Iterator[str]:
    """The `*.trans.txt` files under a LibriSpeech root, sorted, as paths or URIs."""
    yield from find_files(root, lambda name: name.endswith(".trans.txt"))


def _librispeech_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
    root = src.path
    _, base = uri.fs_and_path(root)
    chars = int(limits.json_max_element_mb * 2**20)
    index = 0
    for path in transcripts(root):
        rel = posixpath.relpath(uri.fs_and_path(path)[1], base).replace(os.sep, "/")
        rel_dir = posixpath.dirname(rel)
        try:
            with open_guarded(path, "transcript", limits.max_file_mb, root=root, shown=rel) as f:
                for lineno, line, size in iter_lines(f, chars):
                    if size == len(line) and not line.strip():
                        continue
                    if index < start:
                        yield Item(index, "", line.decode("utf-8", "surrogateescape"))
                        index += 1
                        continue
                    item = Item(index, f"{rel}:line {lineno}", line.decode("utf-8", "surrogateescape"))
                    item.error = _line_error(line, size, limits)
                    if item.error is None:
                        _transcript_line(src, item, line, rel_dir)
                    yield item
                    index += 1
        except Rejected as err:  # the transcript file itself (the guard): one input
            if index >= start:
                yield Item(index, f"{rel}:file", "", error=err)
            index += 1


def _transcript_line(src: SourceConfig, item: Item, line: bytes, rel_dir: str) -> None:
    with rejects_into(item, src, utf8=True):
        utt, text = transcript_fields(line, item)
        audio = posixpath.normpath(posixpath.join(rel_dir, f"{utt}.flac"))
        item.record = asr_record(src, utt, audio, text, item.lineage)
