"""Writing an exported sample's media, shared by every format: images as their tiles pasted back
into the grid (or as their thumbnail), video frames as an H.264 mp4, audio members as they are;
and the errors an export raises.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
import subprocess
from typing import Any

MEDIA = "audio"  # VITA joins audio paths under AudioFolder/"audio": the shared media folder

# Why a sample is not in an export (written to DEST/skipped.jsonl, counted in export.json).
SKIP_REASONS = {
    "audio_not_in_format": "the format has no audio and the audio is not a spoken question",
    "sample_unreadable": "the sample has no readable JSON member",
    "multi_image_not_in_format": "LLaVA-1.5 reads one image per record (--llava-version "
                                 "onevision writes a list)",
    "video_not_in_format": "LLaVA-1.5 reads no video (--llava-version onevision does)",
    "placeholder_not_in_format": "a placeholder the format's loader would keep as literal text",
}


class ExportError(RuntimeError):
    """The export cannot be made; the message says why and what to do."""


class NotExported(Exception):
    """One sample the format cannot hold."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"


def grid_image(members: dict[str, bytes], names: list[str], cols: int, rows: int,
               size: int) -> bytes:
    """The tiles of one image pasted back row-major into its (cols*size, rows*size) grid."""
    from PIL import Image

    canvas = Image.new("RGB", (cols * size, rows * size))
    for i, name in enumerate(names[: cols * rows]):
        tile = Image.open(io.BytesIO(members[name])).convert("RGB")
        if tile.size != (size, size):
            tile = tile.resize((size, size), Image.BICUBIC)
        canvas.paste(tile, ((i % cols) * size, (i // cols) * size))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def frames_video(frames: list[bytes], path: str, fps: int) -> None:
    """JPEG frames as an H.264 mp4 at `fps`, one video frame per JPEG, with the ffmpeg
    imageio-ffmpeg ships."""
    import imageio_ffmpeg

    tmp = f"{path}.tmp.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
           "-f", "image2pipe", "-c:v", "mjpeg", "-framerate", str(fps), "-i", "pipe:0",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
           "-threads", "1", "-r", str(fps), "-movflags", "+faststart", "-fflags", "+bitexact",
           "-flags:v", "+bitexact", tmp]
    run = subprocess.run(cmd, input=b"".join(frames), capture_output=True)
    if run.returncode != 0:
        raise ExportError(f"ffmpeg could not encode {path}: {run.stderr.decode()[-500:]}")
    os.replace(tmp, path)


def write_file(root: str, rel: str, data: bytes) -> None:
    full = os.path.join(root, rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    tmp = f"{full}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, full)


def image_tiles(rec: dict[str, Any]) -> list[int]:
    """The tile count of each of the record's images (thumbnail included), as tiled."""
    tiling = (rec.get("meta") or {}).get("tiling") or {}
    return [int(im.get("tiles") or im["grid"][0] * im["grid"][1]) for im in tiling.get("images") or []]


def _thumbnail(members: dict[str, bytes], listed: list[str], im: dict[str, Any], size: int
               ) -> bytes:
    """The image as one size x size tile: its thumbnail tile (last of its tiles), its only tile,
    or (tiled without a thumbnail) its grid scaled down."""
    from PIL import Image

    cols, rows = im["grid"]
    first = im.get("first_tile", 0)
    if cols * rows == 1:
        return members[listed[first]]
    if im.get("thumbnail", True):
        return members[listed[first + cols * rows]]
    grid = Image.open(io.BytesIO(grid_image(members, listed[first:first + cols * rows], cols,
                                            rows, size)))
    buf = io.BytesIO()
    grid.resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class MediaFiles:
    """Writes one sample's media under the folder `base` and returns the paths its record names:
    `prefix` + the path inside `base` (the prefix is where `base` is, seen from the loader's
    media folder)."""

    def __init__(self, base: str, prefix: str, fps: int) -> None:
        self.base, self.prefix, self.fps = base, prefix, fps

    def _put(self, rel: str, data: bytes) -> str:
        write_file(self.base, rel, data)
        return posixpath.join(self.prefix, rel) if self.prefix else rel

    def images(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str,
               thumbnails: bool = False) -> list[str]:
        """One file per image: its grid of tiles, or with `thumbnails` its one 448x448 tile
        (the thumbnail, or the only tile), for a loader that will not tile it."""
        meta = rec.get("meta") or {}
        listed = (meta.get("members") or {}).get("image") or sorted(
            n for n in members if n.startswith(("tile_", "image_")))
        tiling = meta.get("tiling") or {}
        size = int((tiling.get("params") or {}).get("image_size", 448))
        paths = []
        if tiling.get("images"):
            for i, im in enumerate(tiling["images"]):
                cols, rows = im["grid"]
                first = im.get("first_tile", 0)
                if thumbnails:
                    paths.append(self._put(f"images/{folder}/{key}_{i}.thumb.jpg",
                                           _thumbnail(members, listed, im, size)))
                else:
                    paths.append(self._put(f"images/{folder}/{key}_{i}.jpg", grid_image(
                        members, listed[first:first + cols * rows], cols, rows, size)))
        else:  # passed through untransformed: the file itself
            for i, name in enumerate(listed):
                paths.append(self._put(f"images/{folder}/{key}_{i}{os.path.splitext(name)[1] or '.jpg'}",
                                       members[name]))
        return paths

    def video(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str) -> str:
        listed = ((rec.get("meta") or {}).get("members") or {}).get("video") or sorted(
            n for n in members if n.startswith(("frame_", "video_")))
        if listed and listed[0].startswith("video_"):
            return self._put(f"videos/{folder}/{key}{os.path.splitext(listed[0])[1] or '.mp4'}",
                             members[listed[0]])
        rel = f"videos/{folder}/{key}.mp4"
        full = os.path.join(self.base, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        frames_video([members[n] for n in listed], full, self.fps)
        return posixpath.join(self.prefix, rel) if self.prefix else rel

    def audio(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str
              ) -> list[str]:
        listed = ((rec.get("meta") or {}).get("members") or {}).get("audio") or sorted(
            n for n in members if n.startswith("audio_"))
        return [self._put(f"speech/{folder}/{key}_{i}{os.path.splitext(name)[1] or '.flac'}",
                          members[name]) for i, name in enumerate(listed)]
