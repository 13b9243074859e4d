"""Streaming, fault-tolerant readers for a JSON array file and for JSON Lines.

LLaVA/ShareGPT4V files are one JSON array of several GB; loading them whole is not an option.
`iter_json_array` decodes one element at a time with the C decoder, and when an element is
malformed it finds the element's end with a structural scan, reports that element, and goes on
with the next: one bad record costs one reject, not the file.

Text is decoded as UTF-8 with `surrogateescape`, so invalid bytes survive as lone surrogates and
are reported per element (`invalid_utf8`) instead of failing the whole file.

What one element may cost is bounded: an element larger than `max_chars` is skipped by a
streaming scan that holds none of it (`element_too_large`, and the reader goes on with the
next element), and one nested deeper than `max_depth` is rejected (`json_too_deep`) instead of
raising RecursionError out of the decoder and ending the build.
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
_STR_BODY = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+', re.S)  # a string's inside, escapes included
_BAD_UTF8 = re.compile("[\udc80-\udcff]")
_DECODER = json.JSONDecoder()
MAX_DEPTH = 64  # limits.json_max_depth's default
MAX_ELEMENT_CHARS = 16 * 2**20  # limits.json_max_element_mb's default (in characters)
_KEEP = 2048  # what a reject keeps of an element too large to hold


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


def too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests containers deeper than `limit` (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _depth_error(raw: str, value: Any, limit: int) -> Rejected | None:
    # Counting brackets is C-fast and bounds the depth from above; only an element with more
    # brackets than the limit (some may sit in strings) is walked.
    if raw.count("[") + raw.count("{") <= limit or not too_deep(value, limit):
        return None
    return Rejected("json_too_deep", f"the element nests deeper than {limit} levels "
                                     "(limits.json_max_depth)")


def _close_quote(buf: str, i: int) -> int:
    """Where the string whose inside starts at `i` closes (its quote), or -1 when it does not
    close in `buf`. str.find does the scanning; strings dense with escapes go to the regex."""
    hops = 0
    while True:
        q = buf.find('"', i)
        if q == -1:
            return -1
        bs = buf.find("\\", i, q)
        if bs == -1:
            return q
        hops += 1
        if hops > 64:
            e = _STR_BODY.match(buf, bs).end()
            return e if e < len(buf) and buf[e] == '"' else -1
        i = bs + 2


def _skip_element(b: _Buffer, start: int) -> tuple[str, int, bool]:
    """Skip the element at `start` without holding it: (its first chars, chars skipped,
    whether its end was found before the end of the file). A structural scan: strings are
    jumped over with str.find, so a 200 MB string costs one pass and a chunk of memory."""
    head = b.buf[start:start + _KEEP]
    depth, in_str, escaped, skipped, i = 0, False, False, 0, start
    while True:
        buf, n = b.buf, len(b.buf)
        if escaped and i < n:
            i, escaped = i + 1, False
        while i < n:
            if in_str:
                j = _close_quote(buf, i)
                if j == -1:  # the string goes on; a lone backslash at the end escapes what comes
                    escaped = (n - i - len(buf[i:].rstrip("\\"))) % 2 == 1
                    i = n
                    break
                i, in_str = j + 1, False
                continue
            m = _STRUCT.search(buf, i)
            if m is None:
                i = n
                break
            c, j = m.group(), m.start()
            if c == '"':
                i, in_str = j + 1, True
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    b.pos = j + 1
                    return head, skipped + j + 1 - start, True
                if depth < 0:
                    b.pos = j
                    return head, skipped + j - start, True
            elif depth == 0:  # a comma ends a scalar element
                b.pos = j
                return head, skipped + j - start, True
            i = j + 1
        skipped += n - start
        b.pos = n
        if not b.fill():
            return head, skipped, False
        start = i = 0


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
            q = _close_quote(buf, j + 1)
            if q == -1:
                return None
            i = q + 1
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

    def fill(self, at_least: int = 0) -> bool:
        """Read the next chunk (at least `at_least` bytes: an element that is still open is
        read on in doubling chunks, so it is decoded and scanned a few times, not once a
        chunk)."""
        if self.eof:
            return False
        data = self.f.read(max(self.chunk, at_least))
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


def iter_json_array(f: IO[bytes], chunk: int = 1 << 20, max_depth: int = MAX_DEPTH,
                    max_chars: int = MAX_ELEMENT_CHARS) -> Iterator[RawValue]:
    b = _Buffer(f, min(chunk, max_chars + 1))
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
                if end - start > max_chars:
                    yield _too_large(index, raw[:_KEEP], end - start, max_chars, True)
                    break
                err = _check_utf8(raw) or _depth_error(raw, value, max_depth)
                yield RawValue(index, f"element {index}", raw, None if err else value, err)
                break
            except (json.JSONDecodeError, RecursionError) as exc:
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
                if end is None and not b.eof and len(b.buf) - start <= max_chars:
                    b.pos = start
                    b.fill(min(len(b.buf) - start, max_chars + 1 - (len(b.buf) - start)))
                    start = b.pos
                    continue
                if end is None and not b.eof:  # too large to hold: skip it, go on after it
                    head, skipped, found = _skip_element(b, start)
                    yield _too_large(index, head, skipped, max_chars, found)
                    end = b.pos
                    break
                if end is None:  # truncated at EOF: the rest is one reject
                    end = len(b.buf)
                raw = b.buf[start:end]
                if isinstance(exc, RecursionError):
                    reason = Rejected("json_too_deep", "the element nests deeper than the "
                                                       "decoder goes")
                else:
                    reason = Rejected("malformed_json",
                                      f"{exc.msg} at char {exc.pos - start} of the element")
                yield RawValue(index, f"element {index}", raw[:max_chars + 1],
                               error=_check_utf8(raw) or reason)
                break
        index += 1
        b.pos = end
        if b.eof and end >= len(b.buf):
            break
        if b.skip_ws() == ",":
            b.pos += 1


def _too_large(index: int, head: str, size: int, limit: int, found_end: bool) -> RawValue:
    tail = "the reader went on after it" if found_end else "it runs to the end of the file"
    return RawValue(index, f"element {index}", head, error=Rejected(
        "element_too_large", f"{size:,}{'' if found_end else '+'} characters > {limit:,} "
                             f"(limits.json_max_element_mb); {tail}"))


def _read_line(f: IO[bytes], max_bytes: int) -> tuple[bytes, int]:
    """The next line, at most `max_bytes` of it kept: (kept bytes, the line's whole length).
    A longer line is read to its end in chunks that are dropped."""
    line = f.readline(max_bytes + 1)
    size = len(line)
    if size <= max_bytes or line.endswith(b"\n"):
        return line, size
    while True:
        more = f.readline(1 << 20)
        size += len(more)
        if not more or more.endswith(b"\n"):
            return line[:_KEEP], size


def iter_lines(f: IO[bytes], max_bytes: int = MAX_ELEMENT_CHARS
               ) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, whole length) for every line of `f`, never holding more than
    `max_bytes` of one: a line longer than that comes back cut, with its length."""
    lineno = 0
    while True:
        line, size = _read_line(f, max_bytes)
        if not size:
            return
        lineno += 1
        yield lineno, line, size


def iter_json_lines(f: IO[bytes], max_depth: int = MAX_DEPTH,
                    max_chars: int = MAX_ELEMENT_CHARS) -> Iterator[RawValue]:
    """JSON Lines: one value per non-blank line; blank lines are not inputs."""
    index = 0
    for lineno, line, size in iter_lines(f, max_chars):
        if size > max_chars:
            raw = line.decode("utf-8", "surrogateescape")
            yield RawValue(index, f"line {lineno}", raw, error=Rejected(
                "element_too_large", f"the line is {size:,} bytes > {max_chars:,} "
                                     "(limits.json_max_element_mb); the reader went on after it"))
            index += 1
            continue
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
        raw = text.rstrip("\r\n")
        try:
            value = json.loads(text)
            err = _depth_error(raw, value, max_depth)
            yield RawValue(index, f"line {lineno}", raw, None if err else value, err)
        except json.JSONDecodeError as exc:
            yield RawValue(index, f"line {lineno}", raw,
                           error=Rejected("malformed_json", f"{exc.msg} at column {exc.colno}"))
        except RecursionError:
            yield RawValue(index, f"line {lineno}", raw, error=Rejected(
                "json_too_deep", "the line nests deeper than the decoder goes"))
        index += 1
