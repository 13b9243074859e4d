"""`format: messages`: OpenAI-style chat records, JSON or JSON Lines, as VITA records.

    {"id": "q1", "messages": [
       {"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": [{"type": "image", "image": "imgs/1.jpg"},
                                    {"type": "text", "text": "What is this?"}]},
       {"role": "assistant", "content": "A cat."}]}

A user turn becomes a human turn whose media parts become placeholders (`<image>`, `<video>`,
`<audio>`, each on its own line, in the order of the parts) and whose text parts follow in
order; an assistant turn becomes a gpt turn. System prompts are kept in `meta.system`: VITA's
turns have no system role, and dropping them would lose what the answers were written under.
A media part names its file (`image`, `path`, `file`, or `image_url.url` as a relative path), or
takes the next one of the record's top-level `images` / `videos` / `audios` list (the layout of
chat templates that keep media apart); content given as a string may hold `<image>` markers
for that list too. What has no VITA form is rejected with its reason, not guessed at: a tool or
function role or call (`unsupported_role`), media in an assistant turn, a URL or inline data,
a second video, a system message after the first turn (`unmappable_content`), an image part
with no file (`media_part_without_file`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from schemas.config import SourceConfig
from schemas.params import LimitsConfig
from schemas.record import Record, parse_record
from schemas.rejects import Rejected
from storage.jsonstream import RawValue
from storage.readbase import Item, _items, _language, _raw_id, _values, check_kind_media

_ROLES = {"user": "human", "assistant": "gpt"}
_MEDIA = {"image": "image", "image_url": "image", "video": "video", "video_url": "video",
          "audio": "audio", "input_audio": "audio", "audio_url": "audio"}
_LISTS = {"image": "images", "video": "videos", "audio": "audios"}
_MARKER = re.compile(r"<(image|video|audio)>")
_KNOWN = {"id", "messages"} | set(_LISTS.values())


def message_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
    yield from _items(src, start, _values(src, limits),
                      lambda rv, lineage: _message_record(src, rv, lineage))


def _message_record(src: SourceConfig, rv: RawValue, lineage: str) -> tuple[str, Record]:
    v = rv.value
    if not isinstance(v, dict):
        raise Rejected("not_an_object", f"got a JSON {type(v).__name__}")
    rid = _raw_id(src, rv)
    assert rid is not None
    msgs = v.get("messages")
    if msgs is None:
        raise Rejected("missing_conversations", f"record {rid!r} has no `messages` "
                                                f"(keys {sorted(v)[:10]})")
    if not isinstance(msgs, list):
        raise Rejected("bad_conversations", f"`messages` is a {type(msgs).__name__}, not a list")
    pools = {kind: _pool(v.get(name), name) for kind, name in _LISTS.items()}
    media: dict[str, list[str]] = {"image": [], "video": [], "audio": []}
    turns: list[dict[str, str]] = []
    system: list[str] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Rejected("bad_conversations", f"messages[{i}] is not an object")
        role = m.get("role")
        if role == "system":
            if turns:
                raise Rejected("unmappable_content", f"messages[{i}]: a system message after the "
                                                     "conversation began")
            system.append(_text_only(m.get("content"), i))
            continue
        if role not in _ROLES or m.get("tool_calls") or m.get("function_call"):
            what = "a tool or function call" if role in _ROLES else f"role {role!r}"
            raise Rejected("unsupported_role", f"messages[{i}] is {what}; VITA's turns are "
                                               "human and gpt")
        if role == "assistant":
            turns.append({"from": "gpt", "value": _text_only(m.get("content"), i)})
        else:
            turns.append({"from": "human", "value": _user_text(m.get("content"), i, pools, media)})
    for kind, pool in pools.items():
        if pool:
            raise Rejected("placeholder_mismatch", f"{len(pool)} of the record's {_LISTS[kind]} "
                                                   "are named by no content part")
    if len(media["video"]) > 1:
        raise Rejected("unmappable_content", f"{len(media['video'])} videos; a VITA record holds one")
    data: dict[str, Any] = {"id": rid, "set": src.name, "conversations": turns}
    if media["image"]:
        data["image"] = media["image"][0] if len(media["image"]) == 1 else media["image"]
    if media["video"]:
        data["video"] = media["video"][0]
    if media["audio"]:
        data["audio"] = media["audio"]
    text = "\n".join(t["value"] for t in turns)
    meta: dict[str, Any] = {"task": src.kind, "source": src.name, "lineage": lineage,
                            "language": _language(src, text), "licence": src.licence}
    if system:
        meta["system"] = system[0] if len(system) == 1 else system
    extra = {k: val for k, val in v.items() if k not in _KNOWN}
    if extra:
        meta["source_fields"] = extra
    data["meta"] = meta
    rec = parse_record(data)
    check_kind_media(src, rec)
    return rid, rec


def _pool(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise Rejected("bad_media_field", f"`{name}` must be a list of file paths")
    return list(value)


def _text_only(content: Any, i: int) -> str:
    """The text of a system or assistant message; media there has no VITA form."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Rejected("bad_conversations", f"messages[{i}].content is a {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in _MEDIA:
            raise Rejected("unmappable_content", f"messages[{i}].content[{j}]: {kind} in a "
                                                 "system or assistant message")
        else:
            raise Rejected("unmappable_content", f"messages[{i}].content[{j}]: part type {kind!r}")
    return "\n".join(out)


def _user_text(content: Any, i: int, pools: dict[str, list[str]],
               media: dict[str, list[str]]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        for m in _MARKER.finditer(content):  # markers name the top-level lists in order
            media[m.group(1)].append(_take(pools, m.group(1), f"messages[{i}] {m.group(0)}"))
        return content
    if not isinstance(content, list):
        raise Rejected("bad_conversations", f"messages[{i}].content is a {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
            continue
        if kind not in _MEDIA:
            raise Rejected("unmappable_content", f"{where}: part type {kind!r}")
        medium = _MEDIA[kind]
        path = _part_file(part, kind, where)
        media[medium].append(path if path is not None else _take(pools, medium, where))
        out.append(f"<{medium}>")
    return "\n".join(out)


def _part_file(part: dict[str, Any], kind: str, where: str) -> str | None:
    """The relative file a media part names, None when it names none."""
    value = part.get(kind)
    if isinstance(value, dict):  # {"image_url": {"url": ...}}, {"input_audio": {"data": ...}}
        if "data" in value:
            raise Rejected("unmappable_content", f"{where}: inline {kind} data, not a file")
        value = value.get("url") or value.get("path")
    for key in ("path", "file", "url"):
        if not value:
            value = part.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Rejected("bad_media_field", f"{where}: the {kind} is a {type(value).__name__}")
    if value.startswith(("http://", "https://", "data:")):
        raise Rejected("unmappable_content", f"{where}: a URL or inline data ({value[:40]!r}), "
                                             "not a file under the media root")
    return value[len("file://"):] if value.startswith("file://") else value


def _take(pools: dict[str, list[str]], medium: str, where: str) -> str:
    if not pools[medium]:
        raise Rejected("media_part_without_file", f"{where}: a part of type {medium} with no "
                                                  f"file, and no `{_LISTS[medium]}` left to name "
                                                  "one")
    return pools[medium].pop(0)

