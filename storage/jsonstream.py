"""Streaming, fault-tolerant readers for a JSON array file and for JSON Lines.

LLaVA/ShareGPT4V files are one JSON array of several GB; loading them whole is not an option.
`iter_json_array` decodes one element at a time with the C decoder, and when an element is
malformed it finds the element's end with a structural scan, reports that element, and goes on
with the next: one bad record costs one reject, not the file.

Text is decoded as UTF-8 with `surrogateescape`, so invalid bytes survive as lone surrogates and
are reported per element (`invalid_utf8`) instead of failing the whole file.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from schemas.rejects import Rejected

_WS = re.compile(r"[ \t\n\r]*")
_STRUCT = re.compile(r'["\[\]{},]')
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.S)
_BAD_UTF8 = re.compile("[\udc80-\udcff]")
_DECODER = json.JSONDecoder()
MAX_ELEMENT_CHARS = 64 * 2**20


@dataclass
class RawValue:
    """One element/line of an input file: the parsed value, or the reason it could not be."""

    index: int
    where: str  # "element 12" / "line 13"
    raw: str
    value: Any = None
    error: Rejected | None = None


def _check_utf8(raw: str) -> Rejected | None:
    m = _BAD_UTF8.search(raw)
    if m is None:
        return None
    return Rejected("invalid_utf8", f"invalid byte 0x{ord(m.group()) - 0xDC00:02x} at char {m.start()}")


def _scan_end(buf: str, pos: int) -> int | None:
    """End of the JSON value starting at `pos` (exclusive), or None if the buffer ends first."""
    depth = 0
    i = pos
    while True:
        m = _STRUCT.search(buf, i)
        if m is None:
            return None
        c, j = m.group(), m.start()
        if c == '"':
            s = _STRING.match(buf, j)
            if s is None:
                return None
            i = s.end()
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return j + 1
            if depth < 0:
                return j
        elif depth == 0:  # a comma ends a scalar element
            return j
        i = j + 1


class _Buffer:
    def __init__(self, f: IO[bytes], chunk: int) -> None:
        self.f, self.chunk = f, chunk
        self.dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False

    def fill(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(self.chunk)
        self.eof = not data
        self.buf = self.buf[self.pos :] + self.dec.decode(data, final=self.eof)
        self.pos = 0
        return True

    def skip_ws(self) -> str:
        """Skip whitespace (reading more as needed); return the next char or '' at EOF."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""


def iter_json_array(f: IO[bytes], chunk: int = 1 << 20) -> Iterator[RawValue]:
    b = _Buffer(f, chunk)
    b.fill()
    if b.buf.startswith("\ufeff"):
        b.pos = 1
    first = b.skip_ws()
    if first != "[":
        raw = b.buf[b.pos : b.pos + 2048]
        yield RawValue(0, "file", raw, error=Rejected(
            "malformed_json",
            "the file is not a JSON array (for JSON Lines, name the file *.jsonl)",
        ))
        return
    b.pos += 1
    index = 0
    while True:
        c = b.skip_ws()
        if c == "]":
            break
        if c == "":
            # The array never closed: a truncated file. Elements before were read normally.
            break
        if c == ",":  # tolerate a stray/extra comma (e.g. ",," or "[,")
            b.pos += 1
            continue
        start = b.pos
        while True:
            try:
                value, end = _DECODER.raw_decode(b.buf, start)
                if end >= len(b.buf) and not b.eof:  # a number may go on in the next chunk
                    b.pos = start
                    b.fill()
                    start = b.pos
                    continue
                raw = b.buf[start:end]
                err = _check_utf8(raw)
                yield RawValue(index, f"element {index}", raw, None if err else value, err)
                break
            except json.JSONDecodeError as exc:
                end = _scan_end(b.buf, start)
                # A bad element absorbs what follows it up to the next top-level separator, so
                # junk after mismatched brackets is not mistaken for further elements.
                while end is not None:
                    end = max(end, start + 1)
                    nxt = _WS.match(b.buf, end).end()
                    if nxt < len(b.buf) and b.buf[nxt] not in ",]":
                        end = _scan_end(b.buf, nxt)
                        if end is not None and end <= nxt:  # a stray closer: take it
                            end = nxt + 1
                        continue
                    if nxt >= len(b.buf) and not b.eof:
                        end = None
                    break
                if end is None and not b.eof and len(b.buf) - start < MAX_ELEMENT_CHARS:
                    b.pos = start
                    b.fill()
                    start = b.pos
                    continue
                if end is None:  # truncated at EOF, or a runaway element: the rest is one reject
                    end = len(b.buf)
                    b.eof = True
                raw = b.buf[start:end]
                detail = f"{exc.msg} at char {exc.pos - start} of the element"
                yield RawValue(index, f"element {index}", raw,
                               error=_check_utf8(raw) or Rejected("malformed_json", detail))
                break
        index += 1
        b.pos = end
        if b.eof and end >= len(b.buf):
            break
        if b.skip_ws() == ",":
            b.pos += 1


def iter_json_lines(f: IO[bytes]) -> Iterator[RawValue]:
    """JSON Lines: one value per non-blank line; blank lines are not inputs."""
    index = 0
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = line.decode("utf-8", "surrogateescape")
            yield RawValue(index, f"line {lineno}", raw,
                           error=Rejected("invalid_utf8", f"invalid byte at offset {exc.start}"))
            index += 1
            continue
        text = text.lstrip("\ufeff")
        try:
            value = json.loads(text)
            yield RawValue(index, f"line {lineno}", text.rstrip("\r\n"), value)
        except json.JSONDecodeError as exc:
            yield RawValue(index, f"line {lineno}", text.rstrip("\r\n"),
                           error=Rejected("malformed_json", f"{exc.msg} at column {exc.colno}"))
        index += 1
