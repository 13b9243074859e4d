"""Media checks and pass-through: decide whether a record's media are usable, and name members.

Checks decode enough to catch what breaks training later (truncated and corrupt files,
decompression bombs) without paying for a full-resolution decode: a JPEG is decoded through
libjpeg's DCT scaling at 1/8 size, which still reads every entropy-coded byte, so truncation
shows, at a fraction of the cost.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import soundfile as sf
from PIL import Image, UnidentifiedImageError

from schemas.record import Record
from schemas.rejects import Rejected

_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
            "TIFF": "tif", "MPO": "jpg"}


@dataclass
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


# Sizes are checked against the configured limits below, before any pixel is decoded. PIL's
# own warning (at 89 MP) would only be noise, and its own error (at 179 MP) would refuse what
# media.max_image_pixels allows, citing its number instead of the configured one.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
Image.MAX_IMAGE_PIXELS = None
DEFAULT_DECODED_BYTES = 512 * 2**20  # limits.image_max_decoded_mb's default

_WIDE_MODES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decoded_bytes(im: Image.Image) -> int:
    """Width x height x channels x bytes per channel of an opened image, from its header (a
    16-bit PNG counts 2 bytes per channel, though PIL keeps 8 of its RGB bits)."""
    w, h = im.size
    channels = len(im.getbands())
    depth = _WIDE_MODES.get(im.mode, 1)
    tile = getattr(im, "tile", None) or []
    if depth == 1 and any(";16" in str(t[3]) for t in tile if len(t) > 3):
        depth = 2
    return w * h * channels * depth


def open_header(data: bytes, max_pixels: int, max_decoded: int | None = None) -> Image.Image:
    """Open an image's header (no pixels decoded); refuse empty, unreadable and bomb images:
    more than `max_pixels` pixels, or more than `max_decoded` bytes once decoded."""
    if not data:
        raise Rejected("empty_file", "zero-byte image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise Rejected("image_too_large", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise Rejected("image_decode_error", f"not a readable image: {err}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise Rejected("image_decode_error", f"image header claims size {w}x{h}")
    if w * h > max_pixels:
        raise Rejected("image_too_large", f"{w}x{h} = {w * h} pixels > {max_pixels} "
                                          "(media.max_image_pixels)")
    budget = DEFAULT_DECODED_BYTES if max_decoded is None else max_decoded
    need = decoded_bytes(im)
    if need > budget:
        raise Rejected("image_too_large", f"{w}x{h} {im.mode} decodes to {need / 2**20:.0f} MiB "
                                          f"> {budget / 2**20:.0f} MiB (limits.image_max_decoded_mb)")
    return im


def load_pixels(im: Image.Image, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode the pixels (a JPEG at a reduced scale when `draft_to` allows); truncated or
    corrupt data raises `image_decode_error`."""
    try:
        if draft_to is not None and im.format == "JPEG":
            im.draft(im.mode if im.mode in ("RGB", "L") else None, draft_to)
        im.load()
    except Image.DecompressionBombError as err:
        raise Rejected("image_too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise Rejected("image_decode_error", f"{err}") from None
    return im


def check_image(data: bytes, max_pixels: int, max_decoded: int | None = None) -> ImageInfo:
    im = open_header(data, max_pixels, max_decoded)
    info = ImageInfo(im.size[0], im.size[1], im.format or "", im.mode)
    # libjpeg's 1/8 DCT scaling still reads every entropy-coded byte: truncation shows.
    load_pixels(im, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
    return info


def check_audio(data: bytes) -> dict[str, Any]:
    if not data:
        raise Rejected("empty_file", "zero-byte audio")
    try:
        info = sf.info(io.BytesIO(data))
    except (RuntimeError, sf.LibsndfileError, TypeError) as err:
        raise Rejected("audio_decode_error", f"{err}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise Rejected("audio_decode_error", "the file holds no samples")
    return {"sample_rate": info.samplerate, "channels": info.channels,
            "duration_s": round(info.frames / info.samplerate, 3), "format": info.format}


def check_video_container(data: bytes) -> str:
    """A cheap signature check; frame-level checks belong to the video transform."""
    if not data:
        raise Rejected("empty_file", "zero-byte video")
    head = data[:64]
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "mkv"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:3] == b"FLV":
        return "flv"
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:
        return "ts"
    raise Rejected("video_decode_error", "not a known video container (mp4, mkv/webm, avi, flv, ts)")


def _ext(path: str, default: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext if ext.isalnum() and 0 < len(ext) <= 5 else default


def passthrough_members(
    record: Record, fetch: Callable[..., bytes], max_image_pixels: int,
    max_decoded: int | None = None,
) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """Check every medium of `record`; return its shard members and the meta to add.

    Members are (suffix, bytes): `image_00.jpg`, `video_00.mp4`, `audio_00.flac`, in the
    record's placeholder order.
    """
    members: list[tuple[str, bytes]] = []
    names: dict[str, list[str]] = {}
    info: dict[str, list[dict[str, Any]]] = {}
    media = record.media()
    for i, path in enumerate(media["image"]):
        data = fetch(path, "image")
        im = check_image(data, max_image_pixels, max_decoded)
        suffix = f"image_{i:02d}.{_PIL_EXT.get(im.format, _ext(path, 'img'))}"
        members.append((suffix, data))
        names.setdefault("image", []).append(suffix)
        info.setdefault("image", []).append({"width": im.width, "height": im.height,
                                             "format": im.format, "mode": im.mode})
    for i, path in enumerate(media["video"]):
        data = fetch(path, "video")
        container = check_video_container(data)
        suffix = f"video_{i:02d}.{_ext(path, container)}"
        members.append((suffix, data))
        names.setdefault("video", []).append(suffix)
    for i, path in enumerate(media["audio"]):
        data = fetch(path, "audio")
        a = check_audio(data)
        suffix = f"audio_{i:02d}.{_ext(path, 'flac')}"
        members.append((suffix, data))
        names.setdefault("audio", []).append(suffix)
        info.setdefault("audio", []).append(a)
    meta = {"members": names}
    if info:
        meta["media_info"] = info
    return members, meta
