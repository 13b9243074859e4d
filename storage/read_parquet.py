"""`format: parquet`: shards with the media in their rows (HF datasets' layout), as VITA records.

`path` is a file, a folder (its `*.parquet` files, recursively) or a glob; files are read in
sorted order, each row group a batch at a time (storage.embedded.batch_rows: at most 32 rows,
fewer when they are big) with pyarrow, its column chunks streamed a page at a time
(storage.embedded.open_parquet), never a whole file or row group. Each row is one input, with
lineage `<file>:row group K, row R`. What a row becomes is its preset's (schemas.config.PRESET_COLUMNS,
with `columns` renaming any role; `a|b` takes the first column the file has):

- `llava`: `conversations` (a list of {from, value}, or that list as a JSON string), `image`
  (one medium or a list), `video`, `id`: as a LLaVA JSON record;
- `cauldron`: `images` (a list) and `texts` (a list of {user, assistant}): one human/gpt pair
  per entry, the images' placeholders before the first question (unless it holds them);
- `syndog`: `image` and `ground_truth` (SynthDoG's JSON string, `gt_parse.text_sequence`): an
  OCR pair whose question is the source's `ocr_prompt`;
- `hf_audio`: `audio` ({bytes, path, sampling_rate}) and `text` (`text|sentence|transcription`):
  an ASR pair.

A medium is a cell of binary, an HF {bytes, path} struct, or a list of them. Its bytes stay in
the file: the record names them by a reference (storage.embedded) that the worker reads; a
struct with a path and no bytes names a file under `media_root`, like a JSON source's path.
Only the mapped columns are read. The raw input (the reject store's, and what a rerun hashes
to see whether a row changed) is the row as JSON with each medium as its sha256, size and path.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

from schemas.config import SourceConfig, pattern_base
from schemas.params import LimitsConfig
from schemas.record import Record, parse_record
from schemas.rejects import Rejected
from storage import uri
from storage.embedded import (
    batch_rows,
    cell_media,
    check_row_group,
    is_embedded,
    open_parquet,
    parquet_ref,
)
from storage.guard import open_guarded
from storage.readbase import (
    Item,
    _internal,
    _language,
    asr_record,
    check_kind_media,
    data_root,
    find_files,
    rejects_into,
)

_REQUIRED = {"llava": ("conversations",), "cauldron": ("images", "texts"),
             "syndog": ("image", "ground_truth"), "hf_audio": ("audio", "text")}
_MEDIA_ROLES = ("image", "images", "video", "audio")


def parquet_files(src: SourceConfig) -> list[str]:
    """The source's parquet files, sorted."""
    base = pattern_base(src.path)
    fs, p = uri.fs_and_path(src.path)
    if base != src.path:
        found = sorted(fs.glob(p))
        return [f if "://" in f or "://" not in src.path else
                f"{src.path.split('://', 1)[0]}://{f}" for f in found]
    if fs.isdir(p):
        return find_files(src.path, lambda n: n.endswith(".parquet"))
    return [src.path]


def _rel(path: str, root: str) -> str:
    return posixpath.relpath(uri.fs_and_path(path)[1], uri.fs_and_path(root)[1]).replace(
        os.sep, "/")


def parquet_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
    root, index = data_root(src), 0
    for path in parquet_files(src):
        rel = _rel(path, root)
        try:
            with open_guarded(path, "manifest", limits.max_file_mb, root=root, shown=rel) as f:
                try:
                    pf = open_parquet(f)
                except Exception as err:  # noqa: BLE001 - a file pyarrow cannot open: one input
                    if index >= start:
                        yield Item(index, f"{rel}:file", "", error=Rejected(
                            "bad_container", f"{rel} is not a readable parquet file: "
                                             f"{type(err).__name__}: {str(err)[:200]}"))
                    index += 1
                    continue
                for item in _file_items(src, pf, rel, index, start, limits):
                    index = item.index + 1
                    yield item
        except Rejected as err:  # the file itself (the guard): one input
            if index >= start:
                yield Item(index, f"{rel}:file", "", error=err)
            index += 1


def _columns(src: SourceConfig, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """(role -> the file's column, the required roles it lacks)."""
    found, missing = {}, []
    for role, spec in src.column_map().items():
        col = next((c for c in spec.split("|") if c in names), None)
        if col is not None:
            found[role] = col
        elif role in _REQUIRED[src.preset or "llava"]:
            missing.append(f"{role} ({spec})")
    return found, missing


def _file_items(src: SourceConfig, pf: Any, rel: str, index: int, start: int,
                limits: LimitsConfig) -> Iterator[Item]:
    meta = pf.metadata
    cols, missing = _columns(src, pf.schema_arrow.names)
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        problem = None
        if missing:
            problem = Rejected("missing_column", f"{rel} has no column for {', '.join(missing)} "
                                                 f"(it has {pf.schema_arrow.names[:12]})")
        else:
            try:
                check_row_group(meta, rg, sorted(set(cols.values())), limits)
            except Rejected as err:
                problem = err
        row = 0
        if problem is None:
            try:
                names = sorted(set(cols.values()))
                for batch in pf.iter_batches(batch_size=batch_rows(meta, rg, names),
                                             row_groups=[rg], columns=names, use_threads=False):
                    for values in batch.to_pylist():
                        yield _row_item(src, values, cols, rel, rg, row, index, start)
                        row, index = row + 1, index + 1
            except Exception as err:  # noqa: BLE001 - a corrupt page: the group's other rows
                problem = Rejected("bad_container", f"{rel} row group {rg} cannot be read from "
                                                    f"row {row}: {type(err).__name__}: "
                                                    f"{str(err)[:200]}")
        for r in range(row, n):  # the rows of a group that could not be read: each rejected
            if index >= start:
                yield Item(index, f"{rel}:row group {rg}, row {r}", "", error=problem)
            index += 1


def _row_item(src: SourceConfig, values: dict[str, Any], cols: dict[str, str], rel: str,
              rg: int, row: int, index: int, start: int) -> Item:
    lineage = f"{rel}:row group {rg}, row {row}"
    media_cols = {cols[r] for r in _MEDIA_ROLES if r in cols}
    try:
        raw = _raw(values, media_cols)
    except Exception as err:  # noqa: BLE001 - the row's reject names the error
        item = Item(index, lineage, "")
        item.error = _internal(err, src, index, f"{lineage}: ")
        return item
    if index < start:
        return Item(index, "", raw)
    item = Item(index, lineage, raw)
    rid = values.get(cols["id"]) if "id" in cols else None
    item.record_id = str(rid) if rid not in (None, "") else f"{src.name}_{index:08d}"
    with rejects_into(item, src):
        item.record = _record(src, values, cols, item.record_id, lineage, rel, rg, row)
    return item


def _describe(cell: Any) -> Any:
    try:
        media = cell_media(cell)
    except Rejected:
        return repr(cell)[:200]
    if cell is None:
        return None
    out = [{"sha256": hashlib.sha256(b).hexdigest() if b is not None else None,
            "bytes": len(b) if b is not None else None, "path": p} for b, p in media]
    return out if isinstance(cell, list) else out[0]


def _raw(values: dict[str, Any], media_cols: set[str]) -> str:
    shown = {k: (_describe(v) if k in media_cols else v) for k, v in values.items()}
    return json.dumps(shown, ensure_ascii=False, default=str)


def _refs(src: SourceConfig, cell: Any, column: str, rel: str, rg: int, row: int,
          kind: str) -> list[str]:
    """A reference per medium of the cell; a path-only struct names a file under media_root."""
    out = []
    listed = isinstance(cell, list)
    for i, (data, path) in enumerate(cell_media(cell)):
        if data is not None:
            out.append(parquet_ref(rel, rg, row, column, i if listed else None))
        elif path:
            if is_embedded(path):
                raise Rejected("bad_media_field", f"a {kind} path {path[:80]!r} looks like an "
                                                  "embedded reference")
            out.append(path)
        else:
            raise Rejected("null_media", f"{column}[{i}] holds neither bytes nor a path")
    return out


def _record(src: SourceConfig, v: dict[str, Any], cols: dict[str, str], rid: str, lineage: str,
            rel: str, rg: int, row: int) -> Record:
    def media(role: str, kind: str) -> list[str]:
        if role not in cols:
            return []
        return _refs(src, v.get(cols[role]), cols[role], rel, rg, row, kind)

    preset = src.preset
    if preset == "hf_audio":
        audio = media("audio", "audio")
        if not audio:
            raise Rejected("null_media", f"the audio cell ({cols['audio']}) is null")
        if len(audio) > 1:
            raise Rejected("bad_media_field", f"{len(audio)} audio clips in one ASR row")
        text = v.get(cols["text"])
        if not isinstance(text, str):
            raise Rejected("missing_text", f"`{cols['text']}` is a {type(text).__name__}")
        return asr_record(src, rid, audio[0], text, lineage)
    if preset == "llava":
        turns = v.get(cols["conversations"])
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)
            except ValueError:
                raise Rejected("bad_conversations", "`conversations` is a string but not JSON"
                               ) from None
        images, video = media("image", "image"), media("video", "video")
        wanted = sum(str(t.get("value", "")).count("<image>") for t in turns or []
                     if isinstance(t, dict))
        if not images and wanted and "image" in cols:
            raise Rejected("null_media", f"the turns hold {wanted} <image> but the "
                                         f"{cols['image']} cell is null")
    elif preset == "cauldron":
        images, video = media("images", "image"), []
        if not images:
            raise Rejected("null_media", f"the {cols['images']} cell is null or empty")
        texts = v.get(cols["texts"])
        if not isinstance(texts, list) or not texts:
            raise Rejected("bad_conversations", f"`{cols['texts']}` is not a list of "
                                                "{user, assistant}")
        turns = []
        for t in texts:
            if not isinstance(t, dict):
                raise Rejected("bad_conversations", f"a `{cols['texts']}` entry is not an object")
            turns += [{"from": "human", "value": t.get("user")},
                      {"from": "gpt", "value": t.get("assistant")}]
        shown = sum(str(t["value"]).count("<image>") for t in turns if t["from"] == "human")
        if shown == 0 and isinstance(turns[0]["value"], str):
            turns[0]["value"] = "<image>\n" * len(images) + turns[0]["value"]
    else:  # syndog
        images, video = media("image", "image"), []
        if not images:
            raise Rejected("null_media", f"the {cols['image']} cell is null")
        turns = [{"from": "human", "value": f"<image>\n{src.ocr_prompt}"},
                 {"from": "gpt", "value": _ground_truth(v.get(cols["ground_truth"]))}]
    data: dict[str, Any] = {"id": rid, "set": src.name, "conversations": turns}
    if images:
        data["image"] = images if len(images) > 1 or preset == "cauldron" else images[0]
    if video:
        if len(video) > 1:
            raise Rejected("bad_media_field", f"{len(video)} videos in one row")
        data["video"] = video[0]
    text = "\n".join(str(t.get("value")) for t in turns if isinstance(t, dict))
    data["meta"] = {"task": src.kind, "source": src.name, "lineage": lineage,
                    "language": _language(src, text), "licence": src.licence}
    rec = parse_record(data)
    check_kind_media(src, rec)
    return rec


def _ground_truth(value: Any) -> str:
    """SynthDoG's answer: `gt_parse.text_sequence` of the JSON string (or object)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise Rejected("bad_record", "`ground_truth` is not JSON") from None
    parse = value.get("gt_parse") if isinstance(value, dict) else None
    text = parse.get("text_sequence") if isinstance(parse, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise Rejected("missing_text", "`ground_truth` has no gt_parse.text_sequence")
    return text
