"""mp4 / QuickTime inspection from the boxes alone, before any decoder sees the file.

Decoders trust a file's boxes: a truncated mp4 whose index sits at the front opens and seeks
"successfully", and a decoder allocates an index entry per sample the tables claim. So the
boxes are walked here first: a box reaching past the end of the file (truncation), the video
track's rotation, and what each track's sample tables claim, checked against the limits, each
other and the file's size (`check_tracks`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from schemas.rejects import Rejected

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def _boxes(data: bytes, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, pos + size
        pos += size


@dataclass
class TrackFacts:
    """What a track's boxes claim, read before any decoder indexes the file: a decoder
    allocates an index entry per sample the tables claim (a 20 KB .mov claiming 100 million
    frames took 4.9 GB, then failed the build)."""

    handler: bytes = b""
    timescale: int = 0
    duration: int = 0  # in timescale units (mdhd)
    width: int = 0  # the largest of tkhd's presentation size and stsd's coded size
    height: int = 0
    samples: int = 0  # stsz (or stz2) sample count
    sample_size: int = 0  # the constant sample size, 0 when each has its own
    stts_samples: int = 0  # samples the time-to-sample table covers
    problem: str = ""  # a table that claims more entries than its box holds

    @property
    def duration_s(self) -> float:
        return self.duration / self.timescale if self.timescale else 0.0


@dataclass
class Mp4Facts:
    truncated_by: int = 0  # bytes a box claims beyond the end of the file
    rotation: int = 0  # degrees clockwise the player must rotate the video track
    tracks: list[TrackFacts] = field(default_factory=list)


# The top-level boxes an ISO-BMFF file (mp4) or a QuickTime file (.mov, which may lack ftyp)
# starts with.
_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def mp4_facts(data: bytes) -> Mp4Facts:
    facts = Mp4Facts()
    if data[4:8] not in _FIRST_BOXES:
        return facts
    n = len(data)
    for kind, body, end in _boxes(data, 0, n):
        if end > n:
            facts.truncated_by = max(facts.truncated_by, end - n)
        if kind == b"moov":
            for trak_kind, tbody, tend in _boxes(data, body, min(end, n)):
                if trak_kind == b"trak":
                    rot = _track_rotation(data, tbody, min(tend, n))
                    if rot is not None:
                        facts.rotation = rot
                    facts.tracks.append(_track_facts(data, tbody, min(tend, n)))
    return facts


def _u32(data: bytes, at: int) -> int:
    return struct.unpack(">I", data[at:at + 4])[0] if at + 4 <= len(data) else 0


def _track_facts(data: bytes, start: int, end: int) -> TrackFacts:
    t = TrackFacts()

    def table(body: int, bend: int, count_at: int, entry: float, name: str) -> int:
        count = _u32(data, body + count_at)
        room = bend - body - count_at - 4
        if count * entry > room:
            t.problem = t.problem or (f"its {name} box claims {count} entries in {room} bytes")
        return count

    def walk(s: int, e: int, depth: int = 0) -> None:
        for kind, body, bend in _boxes(data, s, e):
            bend = min(bend, e)
            if kind in (b"mdia", b"minf", b"stbl"):
                if depth < 3:  # mdia > minf > stbl; a file nesting them without end is no mp4
                    walk(body, bend, depth + 1)
            elif kind == b"tkhd" and body < bend:
                off = body + (88 if data[body] == 1 else 76)  # width, height: 16.16 fixed point
                t.width, t.height = max(t.width, _u32(data, off) >> 16), \
                    max(t.height, _u32(data, off + 4) >> 16)
            elif kind == b"mdhd" and body < bend:
                if data[body] == 1:
                    t.timescale = _u32(data, body + 20)
                    t.duration = struct.unpack(">Q", data[body + 24:body + 32].rjust(8, b"\0"))[0]
                else:
                    t.timescale, t.duration = _u32(data, body + 12), _u32(data, body + 16)
            elif kind == b"hdlr":
                t.handler = data[body + 8:body + 12]
            elif kind == b"stsd":  # the first sample entry; a visual one has its coded size
                ent = body + 8
                if t.handler == b"vide" and ent + 36 <= bend:
                    w, h = struct.unpack(">HH", data[ent + 32:ent + 36])
                    t.width, t.height = max(t.width, w), max(t.height, h)
            elif kind == b"stts":
                count = table(body, bend, 4, 8, "stts")
                if not t.problem:
                    t.stts_samples = sum(_u32(data, body + 8 + 8 * i) for i in range(count))
            elif kind == b"stsz":
                t.sample_size = _u32(data, body + 4)
                t.samples = _u32(data, body + 8)
                if t.sample_size == 0:
                    table(body, bend, 8, 4, "stsz")
            elif kind == b"stz2":
                bits = data[body + 7] if body + 8 <= bend else 0
                t.samples = table(body, bend, 8, max(bits, 4) / 8, "stz2")
            elif kind in (b"stco", b"stsc"):
                table(body, bend, 4, 4 if kind == b"stco" else 12, kind.decode())
            elif kind == b"co64":
                table(body, bend, 4, 8, "co64")

    walk(start, end)
    return t


def check_tracks(facts: Mp4Facts, size: int, max_frames: int, max_s: float,
                 max_frame_bytes: int) -> None:
    """Refuse what a decoder must not be handed: sample tables that do not fit their boxes,
    or that disagree with each other or with the file's size (`video_decode_error`,
    `video_truncated`); more frames or seconds than the limits (`video_too_long`); frames that
    decode to more than `max_frame_bytes` (`video_too_large`)."""
    for t in facts.tracks:
        what = f"its {t.handler.decode('latin-1') or 'unnamed'} track"
        if t.problem:
            raise Rejected("video_decode_error", f"{what}: {t.problem}")
        if t.handler != b"vide":
            continue
        if t.samples > max_frames or t.stts_samples > max_frames:
            raise Rejected("video_too_long", f"{what} claims {max(t.samples, t.stts_samples)} "
                                             f"frames > {max_frames} (limits.video_max_frames)")
        if t.duration_s > max_s:
            raise Rejected("video_too_long", f"{what} claims {t.duration_s:.1f} s > {max_s} s "
                                             "(limits.video_max_s)")
        if t.samples and t.stts_samples and t.samples != t.stts_samples:
            raise Rejected("video_decode_error", f"{what}: its sample sizes count {t.samples} "
                                                 f"frames, its timing {t.stts_samples}")
        if t.sample_size and t.samples * t.sample_size > size:
            raise Rejected("video_truncated", f"{what} claims {t.samples} frames of "
                                              f"{t.sample_size} bytes in a {size}-byte file")
        if t.width * t.height * 3 > max_frame_bytes:
            raise Rejected("video_too_large", f"{what} has {t.width}x{t.height} frames: "
                                              f"{t.width * t.height * 3 / 2**20:.0f} MiB each > "
                                              f"{max_frame_bytes / 2**20:.0f} MiB "
                                              "(limits.image_max_decoded_mb)")


def _track_rotation(data: bytes, start: int, end: int) -> int | None:
    """The rotation of a video track (hdlr 'vide'), from its tkhd matrix; None otherwise."""
    matrix, is_video = None, False
    for kind, body, bend in _boxes(data, start, end):
        if kind == b"tkhd":
            version = data[body]
            off = body + (52 if version == 1 else 40)
            if off + 36 <= bend:
                matrix = struct.unpack(">9i", data[off:off + 36])
        elif kind == b"mdia":
            for k2, b2, _ in _boxes(data, body, bend):
                if k2 == b"hdlr" and data[b2 + 8:b2 + 12] == b"vide":
                    is_video = True
    if not is_video or matrix is None:
        return None
    a, b = matrix[0] / 65536, matrix[1] / 65536
    return int(round(math.degrees(math.atan2(b, a)))) % 360


