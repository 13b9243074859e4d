"""Audio: decode anything, mono, resample (16 kHz speech input, 24 kHz stage-3 targets), FLAC.

soundfile (libsndfile) reads WAV, FLAC, OGG/Opus and MP3; what it cannot read (m4a/AAC, ...)
is decoded by the bundled ffmpeg. Resampling is polyphase (scipy's resample_poly), which is
exact for the integer ratios that cover common rates (44.1k, 48k, 22.05k, 8k -> 16k/24k).
"""

from __future__ import annotations

import io
import math
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from schemas.params import AudioConfig
from schemas.rejects import Rejected

SPEECH_SR = 16000
TARGET_SR = 24000
AUDIO_TOKENS_PER_S = 12.5  # the audio adapter's output rate


@dataclass
class Audio:
    samples: np.ndarray  # float32 mono
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return self.samples.size / self.sample_rate

    @property
    def rms_dbfs(self) -> float:
        rms = float(np.sqrt(np.mean(np.square(self.samples, dtype=np.float64)))) if self.samples.size else 0.0
        return 20 * math.log10(rms) if rms > 0 else -math.inf

    @property
    def tokens(self) -> int:
        return math.ceil(self.duration_s * AUDIO_TOKENS_PER_S)

    def meta(self) -> dict:
        return {"sample_rate": self.sample_rate, "duration_s": round(self.duration_s, 3),
                "source_rate": self.source_rate, "source_channels": self.source_channels,
                "rms_dbfs": round(self.rms_dbfs, 1) if math.isfinite(self.rms_dbfs) else None}


def _ffmpeg_decode(data: bytes, sr: int) -> tuple[np.ndarray, int, int]:
    from transforms.video import ffmpeg_exe

    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-vn",
         "-ac", "1", "-ar", str(sr), "-f", "f32le", "pipe:1"],
        input=data, capture_output=True)
    if proc.returncode != 0 or not proc.stdout:
        raise Rejected("audio_decode_error",
                       proc.stderr.decode(errors="replace").strip()[-300:] or "no audio decoded")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy(), sr, 0


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x.astype(np.float32, copy=False)
    # Imported here: scipy.signal takes about a second to import, and a build without audio
    # to resample (every worker of an image corpus) need not pay it.
    from scipy.signal import resample_poly

    g = math.gcd(src, dst)
    return resample_poly(x, dst // g, src // g).astype(np.float32)


def load_audio(data: bytes, cfg: AudioConfig = AudioConfig()) -> Audio:
    """Decode, mix to mono, resample; raises Rejected for unusable or out-of-bounds audio."""
    if not data:
        raise Rejected("empty_file", "zero-byte audio")
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        channels = x.shape[1]
        x = resample(x.mean(axis=1), sr, cfg.sample_rate)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        x, sr, channels = _ffmpeg_decode(data, cfg.sample_rate)  # AAC/m4a and other containers
    audio = Audio(x, cfg.sample_rate, sr, channels)
    if audio.samples.size == 0:
        raise Rejected("audio_decode_error", "the file holds no samples")
    if audio.duration_s < cfg.min_s:
        raise Rejected("audio_too_short", f"{audio.duration_s:.3f} s < {cfg.min_s} s")
    if audio.duration_s > cfg.max_s:
        raise Rejected("audio_too_long", f"{audio.duration_s:.3f} s > {cfg.max_s} s")
    if not np.all(np.isfinite(audio.samples)):
        raise Rejected("audio_decode_error", "the decoded samples hold NaN or infinity")
    if audio.rms_dbfs < cfg.silence_dbfs:
        raise Rejected("audio_silent", f"RMS {audio.rms_dbfs:.1f} dBFS < {cfg.silence_dbfs} dBFS")
    return audio


def encode_flac(audio: Audio) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.samples, -1.0, 1.0), audio.sample_rate, format="FLAC",
             subtype="PCM_16")
    return buf.getvalue()
