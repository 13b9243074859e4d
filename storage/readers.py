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
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from schemas.config import SourceConfig
from schemas.params import LimitsConfig
from schemas.record import Record, parse_record
from schemas.rejects import Rejected
from schemas.text import detect_language
from storage import uri
from storage.guard import open_guarded
from storage.jsonstream import RawValue, iter_json_array, iter_json_lines, iter_lines

_RECORD_FIELDS = {"id", "set", "image", "video", "audio", "conversations"}


@dataclass
class Item:
    """One input of a source: its position, where it came from, and what it became."""

    index: int
    lineage: str
    raw: str
    record: Record | None = None
    error: Rejected | None = None
    record_id: str | None = None


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


def default_media_root(src: SourceConfig) -> str:
    if src.media_root is not None:
        return src.media_root
    return data_root(src)


def read_source(src: SourceConfig, start: int = 0, limits: LimitsConfig | None = None
                ) -> Iterator[Item]:
    """Yield every input of `src` from index `start` on (earlier ones are read, not parsed)."""
    limits = limits or LimitsConfig()
    if src.format in ("llava", "vita"):
        items = _conversation_items(src, start, limits)
    elif src.format == "asr_jsonl":
        items = _asr_jsonl_items(src, start, limits)
    elif src.format == "librispeech":
        items = _librispeech_items(src, start, limits)
    elif src.format == "text_lines":
        items = _text_line_items(src, start, limits)
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


def _internal(err: BaseException, src: SourceConfig, index: int, what: str = "") -> Rejected:
    msg = str(err).splitlines()[0][:300] if str(err) else ""
    return Rejected("internal_error", f"{what}{type(err).__name__}: {msg} (source {src.name!r}, "
                                      f"input {index})")


def _file_reject(src: SourceConfig, index: int, where: str, err: Rejected) -> Item:
    """A file that cannot be read: one input, rejected with the guard's reason."""
    return Item(index, _lineage(src, where), "", error=err)


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
           make: Callable[[RawValue, str], tuple[str, Record]]) -> Iterator[Item]:
    """Items from parsed values: unparsed below `start`, else a record from `make` or a reason
    (`internal_error` for what `make` did not foresee)."""
    for rv in values:
        if rv.index < start:
            yield Item(rv.index, "", rv.raw)
            continue
        item = Item(rv.index, _lineage(src, rv.where), rv.raw, error=rv.error)
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
        yield item


def _raw_id(src: SourceConfig, rv: RawValue) -> str | None:
    """The id a parsed value has (or would be given), None when it is not an object."""
    v = rv.value
    if not isinstance(v, dict):
        return None
    rid = v.get("id")
    return f"{src.name}_{rv.index:08d}" if rid is None or rid == "" else str(rid)


def _conversation_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
    def make(rv: RawValue, lineage: str) -> tuple[str, Record]:
        rid, rec = _conversation_record(src, rv)
        if src.kind == "tts_pair":  # the text to speak is the first answer
            answer = next((t.value for t in rec.conversations if t.from_ == "gpt"), "")
            rec = tts_pair_record(src, rid, answer, lineage, rec.meta.language)
        return rid, rec

    yield from _items(src, start, _values(src, limits), make)


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


def _text_line_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
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
                    if item.error is None:
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


def _line_error(line: bytes, size: int, limits: LimitsConfig) -> Rejected | None:
    if size > len(line):
        return Rejected("element_too_large", f"the line is {size:,} bytes > "
                                             f"{int(limits.json_max_element_mb * 2**20):,} "
                                             "(limits.json_max_element_mb); the reader went on "
                                             "after it")
    return None


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


def check_kind_media(src: SourceConfig, rec: Record) -> None:
    """A video source's records hold a video; a text source's hold no media."""
    media = rec.media()
    if src.kind == "video" and not media["video"]:
        raise Rejected("bad_media_field", "a record of a video source has no `video`")
    if src.kind == "text" and any(media.values()):
        raise Rejected("bad_media_field", "a record of a text source has media attached")


def _turn_text(conversations: Any) -> str:
    if not isinstance(conversations, list):
        return ""
    return "\n".join(t["value"] for t in conversations
                     if isinstance(t, dict) and isinstance(t.get("value"), str))


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


def _asr_jsonl_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
    yield from _items(src, start, _values(src, limits),
                      lambda rv, lineage: _asr_from_value(src, rv, lineage))


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


_TRANS_LINE = re.compile(r"^(\S+)[ \t]+(.*)$")


def transcripts(root: str) -> Iterator[str]:
    """The `*.trans.txt` files under a LibriSpeech root, sorted, as paths or URIs."""
    yield from find_files(root, lambda name: name.endswith(".trans.txt"))


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
    try:
        text_line = line.decode("utf-8").strip()
        m = _TRANS_LINE.match(text_line)
        if m is None:
            item.record_id = text_line.split()[0] if text_line.split() else None
            raise Rejected("missing_text", f"no transcript after the id: {text_line!r}")
        utt, text = m.group(1), m.group(2)
        audio = posixpath.normpath(posixpath.join(rel_dir, f"{utt}.flac"))
        item.record_id = utt
        item.record = asr_record(src, utt, audio, text, item.lineage)
    except UnicodeDecodeError as exc:
        item.error = Rejected("invalid_utf8", f"invalid byte at offset {exc.start}")
    except Rejected as err:
        item.error = err
    except Exception as err:  # noqa: BLE001 - the input's reject says what it was
        item.error = _internal(err, src, item.index, f"{item.lineage}: ")
