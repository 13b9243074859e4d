"""Writing an exported sample's media, shared by every format: images as their tiles pasted back
into the grid, video frames as an H.264 mp4, audio members as they are; and the errors an
export raises.
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
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


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


def frames_video(frames: list[bytes], path: str, fps: int = 1) -> None:
    """JPEG frames as an H.264 mp4 at `fps`, with the ffmpeg imageio-ffmpeg ships."""
    import imageio_ffmpeg

    tmp = f"{path}.tmp.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
           "-f", "image2pipe", "-c:v", "mjpeg", "-framerate", str(fps), "-i", "pipe:0",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
           "-r", str(fps), "-movflags", "+faststart", tmp]
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


class MediaFiles:
    """Writes one sample's media under `root` and returns the paths its record names."""

    def __init__(self, root: str, prefix: str, fps: int) -> None:
        self.root, self.prefix, self.fps = root, prefix, fps  # prefix: inside `root`

    def images(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str
               ) -> list[str]:
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
                rel = f"images/{folder}/{key}_{i}.jpg"
                write_file(self.root, posixpath.join(self.prefix, rel),
                       grid_image(members, listed[first:first + cols * rows], cols, rows, size))
                paths.append(rel)
        else:  # passed through untransformed: the file itself
            for i, name in enumerate(listed):
                rel = f"images/{folder}/{key}_{i}{os.path.splitext(name)[1] or '.jpg'}"
                write_file(self.root, posixpath.join(self.prefix, rel), members[name])
                paths.append(rel)
        return paths

    def video(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str) -> str:
        listed = ((rec.get("meta") or {}).get("members") or {}).get("video") or sorted(
            n for n in members if n.startswith(("frame_", "video_")))
        if listed and listed[0].startswith("video_"):
            rel = f"videos/{folder}/{key}{os.path.splitext(listed[0])[1] or '.mp4'}"
            write_file(self.root, posixpath.join(self.prefix, rel), members[listed[0]])
            return rel
        rel = f"videos/{folder}/{key}.mp4"
        full = os.path.join(self.root, self.prefix, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        frames_video([members[n] for n in listed], full, self.fps)
        return rel

    def audio(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str
              ) -> list[str]:
        listed = ((rec.get("meta") or {}).get("members") or {}).get("audio") or sorted(
            n for n in members if n.startswith("audio_"))
        paths = []
        for i, name in enumerate(listed):
            rel = f"speech/{folder}/{key}_{i}{os.path.splitext(name)[1] or '.flac'}"
            write_file(self.root, posixpath.join(self.prefix, rel), members[name])
            paths.append(rel)
        return paths
