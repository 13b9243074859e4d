"""`format: aishell` and `format: transcript_dir`: one `id text` file beside a tree of audio.

AISHELL-1 ships `transcript/aishell_transcript_v0.8.txt` (`BAC009S0002W0122 而 对 楼市 ...`)
beside `wav/<split>/<speaker>/BAC009S0002W0122.wav`; AISHELL-2, MagicData and many in-house
sets have the same shape with other names, which `transcript_dir` takes from the config
(`transcript`, `audio_ext`). Each line is one input: an ASR record whose audio is the file
named by the id anywhere under the root. The text is kept as it is written (AISHELL's word
segmentation spaces too): the transcript is the label, and normalising it is a training
choice, not an ingest one. A line whose id names no audio file is `missing_media`, and one
whose id names two (the same id in two splits) is `bad_media_field`: neither is guessed.

The transcript is opened through the guarded open (inside the root); the audio files are
listed here and opened by the worker, through the guarded open too (storage.media).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

from schemas.config import SourceConfig
from schemas.params import LimitsConfig
from schemas.rejects import Rejected
from storage import uri
from storage.guard import open_guarded
from storage.jsonstream import iter_lines
from storage.readbase import (
    Item,
    _line_error,
    asr_record,
    find_files,
    rejects_into,
    transcript_fields,
)

AISHELL_TRANSCRIPT = "transcript/aishell_transcript_v0.8.txt"


def transcript_path(src: SourceConfig) -> str:
    return src.transcript or AISHELL_TRANSCRIPT


def audio_index(src: SourceConfig) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(id -> audio path relative to the root, id -> its paths where more than one)."""
    root, exts = src.path, tuple(e.lower() for e in src.audio_ext)
    base = uri.fs_and_path(root)[1]
    found: dict[str, str] = {}
    twice: dict[str, list[str]] = {}
    for path in find_files(root, lambda n: n.lower().endswith(exts)):
        rel = posixpath.relpath(uri.fs_and_path(path)[1], base).replace(os.sep, "/")
        name = posixpath.basename(rel)
        utt = name[: name.rfind(".")]
        if utt in found:
            twice.setdefault(utt, [found[utt]]).append(rel)
        else:
            found[utt] = rel
    return found, twice


def transcript_dir_items(src: SourceConfig, start: int, limits: LimitsConfig) -> Iterator[Item]:
    rel = transcript_path(src)
    index = 0
    try:
        with open_guarded(uri.join(src.path, rel), "manifest", limits.max_file_mb,
                          root=src.path, shown=rel) as f:
            audio: dict[str, str] | None = None
            twice: dict[str, list[str]] = {}
            for lineno, line, size in iter_lines(f, int(limits.json_max_element_mb * 2**20)):
                if size == len(line) and not line.strip():
                    continue
                raw = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
                if index < start:
                    yield Item(index, "", raw)
                    index += 1
                    continue
                if audio is None:  # listed once, and only when a line is to be parsed
                    audio, twice = audio_index(src)
                item = Item(index, f"{rel}:line {lineno}", raw)
                item.error = _line_error(line, size, limits)
                if item.error is None:
                    _line(src, item, line, audio, twice)
                yield item
                index += 1
    except Rejected as err:  # the transcript itself (the guard): one input
        if index >= start:
            yield Item(index, f"{rel}:file", "", error=err)


def _line(src: SourceConfig, item: Item, line: bytes, audio: dict[str, str],
          twice: dict[str, list[str]]) -> None:
    with rejects_into(item, src, utf8=True):
        utt, text = transcript_fields(line, item)
        text = text.strip()
        if utt in twice:
            raise Rejected("bad_media_field", f"id {utt!r} names {len(twice[utt])} audio files: "
                                              f"{twice[utt][:3]}")
        if utt not in audio:
            raise Rejected("missing_media", f"no audio file {utt}{{{','.join(src.audio_ext)}}} "
                                            "under the source's folder")
        item.record = asr_record(src, utt, audio[utt], text, item.lineage)
