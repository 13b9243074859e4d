"""Video frames by the paper's rule: 4 frames under 4 s, 1 per second up to 16 s, 16 beyond.

Frames are decoded by seeking (decord; the bundled ffmpeg as the fallback), resized so the
shortest edge is 448 (bicubic) and centre-cropped to 448x448; they are never tiled. The chosen
timestamps go into the record. Two failure modes that decoders hide are checked explicitly:
- a truncated mp4 whose index sits at the front ("faststart") opens and seeks "successfully"
  while its data ends early: the mp4 boxes are walked and a box reaching past the end of the
  file, or frames promised by duration x fps but not decodable, reject the file;
- rotation metadata (the track matrix) is read and recorded; both decoders apply it, and the
  tests check that decord's frames and ffmpeg's autorotated frames agree.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from schemas.params import VideoConfig
from schemas.rejects import Rejected
from transforms.mp4 import Mp4Facts, check_tracks, mp4_facts

FRAME_SIZE = 448
TOKENS_PER_FRAME = 256

try:
    import decord

    decord.bridge.set_bridge("native")
    _HAVE_DECORD = True
except ImportError:  # pragma: no cover - decord is a dependency; ffmpeg is the fallback
    _HAVE_DECORD = False


def sample_times(duration_s: float) -> list[float]:
    """Frame times (seconds) by the paper's rule, each the centre of an equal segment."""
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration must be a positive number of seconds, got {duration_s}")
    if duration_s < 4:
        n = 4
    elif duration_s <= 16:
        n = int(math.floor(duration_s))
    else:
        n = 16
    step = duration_s / n
    return [round((i + 0.5) * step, 6) for i in range(n)]


# --- decoding ------------------------------------------------------------------------------


def fit_frame(frame: np.ndarray, size: int = FRAME_SIZE) -> Image.Image:
    """Shortest edge to `size` (bicubic), then a centre crop to size x size."""
    im = Image.fromarray(frame)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


@dataclass
class Frames:
    times: list[float]  # the requested times
    frame_times: list[float]  # the presentation times of the decoded frames
    frames: list[Image.Image] = field(repr=False)
    duration_s: float = 0.0
    fps: float = 0.0
    rotation: int = 0
    mode: str = "exact"
    backend: str = "decord"
    distinct_frames: int = 0  # how many different source frames the sampled times fell on

    def meta(self) -> dict[str, Any]:
        out = {"frames": len(self.frames), "times": self.times,
               "frame_times": [round(t, 4) for t in self.frame_times],
               "duration_s": round(self.duration_s, 4), "fps": round(self.fps, 4),
               "rotation": self.rotation, "mode": self.mode, "backend": self.backend,
               "distinct_frames": self.distinct_frames or len(self.frames)}
        if out["distinct_frames"] < len(self.frames):
            # A clip shorter than the rule's spacing (or keyframe snapping) repeats frames;
            # the rule still gives its count, and this says that some are the same instant.
            out["repeated_frames"] = (f"{len(self.frames)} frames sampled from "
                                      f"{out['distinct_frames']} distinct source frame(s) of "
                                      f"a {self.duration_s:.3f} s video")
        return out


@dataclass(frozen=True)
class VideoBudget:
    """What decoding one video may cost (LimitsConfig's video_* and image_max_decoded_mb)."""

    max_frames: int = 500_000
    max_s: float = 4 * 3600
    max_frame_bytes: int = 512 * 2**20


def _check_container(data: bytes, budget: VideoBudget) -> Mp4Facts:
    if not data:
        raise Rejected("empty_file", "zero-byte video")
    facts = mp4_facts(data)
    if facts.truncated_by:
        raise Rejected("video_truncated", f"the file ends {facts.truncated_by} bytes before its "
                                          "boxes say it does")
    check_tracks(facts, len(data), budget.max_frames, budget.max_s, budget.max_frame_bytes)
    return facts


def _decord_frames(data: bytes, cfg: VideoConfig, rotation: int,
                   budget: VideoBudget = VideoBudget()) -> Frames:
    try:
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    except (decord.DECORDError, RuntimeError) as err:
        msg = str(err)
        if "video stream" in msg.lower() or "no video" in msg.lower():
            raise Rejected("no_video_stream", "the file holds no video stream") from None
        raise Rejected("video_decode_error", msg.splitlines()[0][:300]) from None
    n = len(vr)
    fps = float(vr.get_avg_fps() or 0)
    if n <= 0 or fps <= 0:
        raise Rejected("video_decode_error", f"the stream reports {n} frames at {fps} fps")
    if n > budget.max_frames:  # containers other than mp4/mov, whose boxes were not read
        raise Rejected("video_too_long", f"the stream reports {n} frames > {budget.max_frames} "
                                         "(limits.video_max_frames)")
    stamps = vr.get_frame_timestamp(range(n))  # (n, 2): start and end of every frame
    starts = stamps[:, 0]
    duration = float(stamps[-1, 1])
    if duration <= 0:
        raise Rejected("video_too_short", f"duration {duration:.3f} s")
    if duration > budget.max_s:
        raise Rejected("video_too_long", f"the stream runs {duration:.1f} s > {budget.max_s} s "
                                         "(limits.video_max_s)")
    times = sample_times(duration)
    if cfg.mode == "keyframe":
        keys = np.asarray(vr.get_key_indices(), dtype=np.int64)
        if keys.size == 0:
            keys = np.zeros(1, dtype=np.int64)
        key_t = starts[keys]
        idx = [int(keys[int(np.argmin(np.abs(key_t - t)))]) for t in times]
    else:
        idx = [int(max(0, np.searchsorted(starts, t, side="right") - 1)) for t in times]
    try:
        # The first frame alone says what one costs; the rest come in batches that keep the
        # decoded frames under the budget (16 frames of 8K video are 1.6 GB).
        first = vr.get_batch(idx[:1]).asnumpy()
        frame_bytes = first[0].nbytes
        if frame_bytes > budget.max_frame_bytes:
            raise Rejected("video_too_large", f"a {first.shape[2]}x{first.shape[1]} frame is "
                                              f"{frame_bytes / 2**20:.0f} MiB > "
                                              f"{budget.max_frame_bytes / 2**20:.0f} MiB "
                                              "(limits.image_max_decoded_mb)")
        frames = [fit_frame(first[0], cfg.frame_size)]  # decord applies the rotation
        del first
        step = max(1, min(16, budget.max_frame_bytes // max(1, 4 * frame_bytes)))
        for i in range(1, len(idx), step):
            frames += [fit_frame(f, cfg.frame_size)
                       for f in vr.get_batch(idx[i:i + step]).asnumpy()]
        # Frames promised by the header must exist: decode the last one too (a truncated file
        # whose index survived fails here even when the sampled frames lie before the cut).
        if cfg.mode == "exact" and idx[-1] != n - 1:
            vr.get_batch([n - 1]).asnumpy()
    except (decord.DECORDError, RuntimeError) as err:
        raise Rejected("video_truncated", f"a frame the index promises does not decode: "
                                          f"{str(err).splitlines()[0][:200]}") from None
    return Frames(times, [float(starts[i]) for i in idx], frames, duration, fps, rotation,
                  cfg.mode, "decord", distinct_frames=len(set(idx)))


def _ffmpeg_probe(path: str) -> tuple[float, float]:
    """(duration, fps) from `ffmpeg -i` (the bundled ffmpeg has no ffprobe)."""
    import re

    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True,
                         text=True, errors="replace").stderr
    if "Stream #" not in out:
        last = [ln for ln in out.splitlines() if ln.strip()][-1:] or ["no streams"]
        raise Rejected("video_decode_error", f"ffmpeg cannot read the file: {last[0][-200:]}")
    if "Video:" not in out:
        raise Rejected("no_video_stream", "the file holds no video stream")
    dur = re.search(r"Duration: (\d+):(\d+):(\d+\.?\d*)", out)
    duration = int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur else 0.0
    fps_m = re.search(r"Video:.*?(\d+(?:\.\d+)?) fps", out)
    return duration, float(fps_m.group(1)) if fps_m else 0.0


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _ffmpeg_frames(data: bytes, cfg: VideoConfig, budget: VideoBudget = VideoBudget()) -> Frames:
    """Seek with the bundled ffmpeg (input seeking, accurate), one frame per time."""
    import ffmpeg

    with tempfile.NamedTemporaryFile(suffix=".video", delete=False) as tmp:
        tmp.write(data)
        path = tmp.name
    try:
        duration, fps = _ffmpeg_probe(path)
        if duration <= 0:
            raise Rejected("video_decode_error", "ffmpeg reports no duration")
        if duration > budget.max_s or duration * fps > budget.max_frames:
            raise Rejected("video_too_long", f"ffmpeg reports {duration:.1f} s at {fps} fps, over "
                                             "limits.video_max_s or video_max_frames")
        times = sample_times(duration)
        frames, got = [], []
        last = max(0.0, (round(duration * fps) - 1) / fps) if fps > 0 else duration
        for t in times:
            # Seek to the start of the frame shown at t (never past the last frame's start:
            # in a clip shorter than the rule's spacing ffmpeg finds nothing after it).
            at = min(math.floor(t * fps + 1e-9) / fps, last) if fps > 0 else t
            # ffmpeg applies rotation metadata itself (autorotate), so no _rotate here.
            out, _ = (ffmpeg.input(path, ss=at)
                      .output("pipe:", vframes=1, format="image2pipe", vcodec="bmp")
                      .run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True))
            if not out:
                raise Rejected("video_truncated", f"no frame decodes at {t:.3f} s of {duration:.3f} s")
            im = Image.open(io.BytesIO(out)).convert("RGB")
            frames.append(fit_frame(np.asarray(im), cfg.frame_size))
            got.append(at)
        distinct = len(set(got))
        return Frames(times, got, frames, duration, fps, 0, "exact", "ffmpeg",
                      distinct_frames=distinct)
    except ffmpeg.Error as err:
        raise Rejected("video_decode_error", err.stderr.decode(errors="replace")[-300:]) from None
    finally:
        os.unlink(path)


def sample_frames(data: bytes, cfg: VideoConfig = VideoConfig(),
                  budget: VideoBudget = VideoBudget()) -> Frames:
    """Decode the paper's frames from an encoded video; raises Rejected for unusable input,
    and for input over `budget` before a decoder indexes it."""
    facts = _check_container(data, budget)
    if cfg.backend == "ffmpeg" or not _HAVE_DECORD:
        return _ffmpeg_frames(data, cfg, budget)
    try:
        return _decord_frames(data, cfg, facts.rotation, budget)
    except Rejected as err:
        if cfg.backend == "auto" and err.reason == "video_decode_error":
            return _ffmpeg_frames(data, cfg, budget)  # a codec or container decord cannot read
        raise


def encode_frames(frames: Frames, quality: int = 95) -> list[bytes]:
    out = []
    for im in frames.frames:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
