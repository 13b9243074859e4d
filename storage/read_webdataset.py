"""`format: webdataset`: img2dataset / video2dataset tar shards as caption records.

`path` is a tar, a folder of `*.tar`, a glob, or a brace pattern (`shards/{00000..00099}.tar`,
local or an fsspec URL). Members are grouped as WebDataset groups them: consecutive members
that share a key (the name up to the first dot of its base name). Each group is one input: its
image (`jpg|jpeg|png|webp`, or `mp4|webm|mkv` for a video source) and its caption (`txt`, else
the `caption` of `json`) make a caption record whose human turn is `<image>` (or `<video>`)
and an instruction from the source's `prompts`, one drawn per record by a seeded hash of
(prompt_seed, id) and recorded in `meta.prompt`. A group with no medium is `missing_media`,
one with no caption `missing_text`; members of other extensions are named in the raw input.

The tar is streamed once on the driver (through the guarded open; every member is read a
chunk at a time, hashed for the raw input and never held whole); the medium stays in the tar,
named by its offset and size (storage.embedded), and the worker reads those bytes alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from braceexpand import braceexpand

from schemas.config import SourceConfig, pattern_base
from schemas.params import LimitsConfig
from schemas.record import parse_record
from schemas.rejects import Rejected
from storage import uri
from storage.embedded import tar_ref
from storage.guard import open_guarded
from storage.readbase import Item, _language, data_root, find_files, rejects_into

IMAGE_EXT = ("jpg", "jpeg", "png", "webp")
VIDEO_EXT = ("mp4", "webm", "mkv", "avi", "mov")
_CHUNK = 1 << 20


def tar_files(src: SourceConfig) -> list[str]:
    fs, p = uri.fs_and_path(src.path)
    proto = src.path.split("://", 1)[0] + "://" if "://" in src.path else ""
    if pattern_base(src.path) == src.path:
        if fs.isdir(p):
            return find_files(src.path, lambda n: n.endswith(".tar"))
        return [src.path]
    out: list[str] = []
    for pat in braceexpand(src.path):
        fs, q = uri.fs_and_path(pat)
        out += [f if "://" in f or not proto else proto + f for f in fs.glob(q)]
    return sorted(set(out))


def prompt_choice(src: SourceConfig, rid: str) -> int:
    """The index of the prompt a record gets: a hash of (prompt_seed, id), so it is the same
    whatever the order or the worker."""
    h = hashlib.sha256(f"{src.prompt_seed}:{rid}".encode()).digest()
    return int.from_bytes(h[:8], "little") % len(src.caption_prompts())


def webdataset_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
    root, index = data_root(src), 0
    for path in tar_files(src):
        rel = posixpath.relpath(uri.fs_and_path(path)[1], uri.fs_and_path(root)[1]).replace(
            os.sep, "/")
        try:
            with open_guarded(path, "manifest", limits.max_file_mb, root=root, shown=rel) as f:
                for group in _groups(f, rel, limits):
                    if index >= start:
                        yield _group_item(src, group, rel, index)
                    else:
                        yield Item(index, "", group.raw())
                    index += 1
        except Rejected as err:  # the tar itself (the guard): one input
            if index >= start:
                yield Item(index, f"{rel}:file", "", error=err)
            index += 1


class _Group:
    def __init__(self, key: str) -> None:
        self.key = key
        self.members: dict[str, dict[str, Any]] = {}  # ext -> offset, size, sha256
        self.text: dict[str, bytes] = {}  # txt / json contents
        self.error: Rejected | None = None

    def raw(self) -> str:
        return json.dumps({"key": self.key, "members": self.members,
                           **{k: v.decode("utf-8", "replace") for k, v in self.text.items()}},
                          ensure_ascii=False, sort_keys=True)


def _groups(f: Any, rel: str, limits: LimitsConfig) -> Iterator[_Group]:
    text_limit = int(limits.json_max_element_mb * 2**20)
    cur: _Group | None = None
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if info.isdir():
                    continue
                base = posixpath.basename(info.name)
                dot = base.find(".")
                key = posixpath.join(posixpath.dirname(info.name), base[:dot] if dot > 0 else base)
                ext = base[dot + 1:].lower() if dot > 0 else ""
                if cur is None or key != cur.key:
                    if cur is not None:
                        yield cur
                    cur = _Group(key)
                if not info.isreg():
                    cur.error = Rejected("not_a_file", f"member {info.name!r} is not a regular "
                                                       "file (a link or a device)")
                    continue
                h, kept = hashlib.sha256(), bytearray()
                stream = tar.extractfile(info)
                assert stream is not None
                while chunk := stream.read(_CHUNK):
                    h.update(chunk)
                    if ext in ("txt", "json") and len(kept) <= text_limit:
                        kept += chunk
                cur.members[ext] = {"offset": info.offset_data, "size": info.size,
                                    "sha256": h.hexdigest()}
                if ext in ("txt", "json"):
                    if len(kept) > text_limit:
                        cur.error = Rejected("element_too_large", f"{info.name} is over "
                                                                  "limits.json_max_element_mb")
                    else:
                        cur.text[ext] = bytes(kept)
    except tarfile.TarError as err:  # the sample being read when the tar broke: one input
        cur = cur or _Group(f"{rel}:start")
        cur.error = Rejected("bad_container", f"{rel} cannot be read on from sample "
                                              f"{cur.key!r}: {err}")
    if cur is not None:
        yield cur


def _group_item(src: SourceConfig, g: _Group, rel: str, index: int) -> Item:
    item = Item(index, f"{rel}:{g.key}", g.raw())
    item.record_id = posixpath.basename(g.key) or f"{src.name}_{index:08d}"
    with rejects_into(item, src):
        if g.error is not None:
            raise g.error
        video = src.kind == "video"
        exts = VIDEO_EXT if video else IMAGE_EXT
        ext = next((e for e in exts if e in g.members), None)
        if ext is None:
            raise Rejected("missing_media", f"sample {g.key!r} has no {'|'.join(exts)} member "
                                            f"(members: {sorted(g.members)})")
        caption = _caption(g)
        choice = prompt_choice(src, item.record_id)
        prompt = src.caption_prompts()[choice]
        m = g.members[ext]
        ref = tar_ref(rel, m["offset"], m["size"])
        holder = "<video>" if video else "<image>"
        data: dict[str, Any] = {
            "id": item.record_id, "set": src.name,
            "conversations": [{"from": "human", "value": f"{holder}\n{prompt}"},
                              {"from": "gpt", "value": caption}],
            "meta": {"task": src.kind, "source": src.name, "lineage": item.lineage,
                     "language": _language(src, caption), "licence": src.licence,
                     "prompt": {"index": choice, "seed": src.prompt_seed}},
        }
        data["video" if video else "image"] = ref
        item.record = parse_record(data)
    return item


def _caption(g: _Group) -> str:
    try:
        if "txt" in g.text:
            text = g.text["txt"].decode("utf-8")
        elif "json" in g.text:
            meta = json.loads(g.text["json"].decode("utf-8"))
            text = meta.get("caption") if isinstance(meta, dict) else None
        else:
            text = None
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"the caption has an invalid byte at {exc.start}") from None
    except ValueError:
        raise Rejected("malformed_json", f"{g.key}.json is not JSON") from None
    if not isinstance(text, str) or not text.strip():
        raise Rejected("missing_text", f"sample {g.key!r} has no caption (.txt, or .json "
                                       "`caption`)")
    return text.strip()
