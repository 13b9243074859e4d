"""Audio: decode anything, mono, resample (16 kHz speech input, 24 kHz stage-3 targets), FLAC.

soundfile (libsndfile) reads WAV, FLAC, OGG/Opus and MP3; what it cannot read (m4a/AAC, ...)
is decoded by the bundled ffmpeg. Resampling is polyphase (scipy's resample_poly), which is
exact for the integer ratios that cover common rates (44.1k, 48k, 22.05k, 8k -> 16k/24k).
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import tempfile
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


_LAYOUT_CHANNELS = {"mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "quad": 4, "4.0": 4, "4.1": 5,
                    "5.0": 5, "5.1": 6, "6.0": 6, "6.1": 7, "7.0": 7, "7.1": 8}
_AUDIO_STREAM = re.compile(r"Stream #\S+.*?Audio: [^,]+(?:\([^)]*\))?, (\d+) Hz, ([^,]+)")


def ffmpeg_audio_stream(stderr: str) -> tuple[int, int]:
    """(sample rate, channels) of the first audio stream in ffmpeg's description of its input;
    0 where it does not say."""
    m = _AUDIO_STREAM.search(stderr)
    if not m:
        return 0, 0
    layout = m.group(2).strip().split("(")[0].strip()
    n = re.match(r"(\d+) channels", layout)
    return int(m.group(1)), int(n.group(1)) if n else _LAYOUT_CHANNELS.get(layout, 0)


def _ffmpeg_decode(data: bytes, sr: int, max_s: float = math.inf) -> tuple[np.ndarray, int, int]:
    from transforms.video import ffmpeg_exe

    # From a file, not a pipe: an mp4/m4a whose index (moov) sits after the data, as ffmpeg
    # itself writes them, cannot be demuxed from a stream that does not seek.
    with tempfile.NamedTemporaryFile(suffix=".audio") as tmp:
        tmp.write(data)
        tmp.flush()
        # Info level: ffmpeg describes its input (rate, channel layout) before it decodes.
        proc = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-loglevel", "info", "-nostats", "-i", tmp.name,
             "-vn", "-ac", "1", "-ar", str(sr),
             # no more than max_s and a little: enough to tell that it is too long
             *(["-t", f"{max_s + 1:.3f}"] if math.isfinite(max_s) else []),
             "-f", "f32le", "pipe:1"],
            capture_output=True)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 or not proc.stdout:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        bad = [ln for ln in lines if "rror" in ln or "nvalid" in ln] or lines[-1:]
        raise Rejected("audio_decode_error", (bad[0] if bad else "no audio decoded")[-300:])
    src_rate, channels = ffmpeg_audio_stream(err)
    return np.frombuffer(proc.stdout, dtype=np.float32).copy(), src_rate or sr, channels


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x.astype(np.float32, copy=False)
    # Imported here: scipy.signal takes about a second to import, and a build without audio
    # to resample (every worker of an image corpus) need not pay it.
    from scipy.signal import resample_poly

    g = math.gcd(src, dst)
    return resample_poly(x, dst // g, src // g).astype(np.float32)


def _read_bounded(data: bytes, cfg: AudioConfig, max_decoded: int
                  ) -> tuple[np.ndarray, int, int]:
    """(float32 frames x channels, rate, channels) of what libsndfile reads, decoding no more
    than `cfg.max_s` and a frame past it. The header's claims are checked first: a 1 s FLAC
    whose header claims 2^36 samples asked numpy for 256 GiB, and ten hours of audio were
    decoded whole before `max_s` was looked at."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        sr, channels, claimed = f.samplerate, f.channels, f.frames
        if not 0 < sr <= MAX_SOURCE_RATE or not 0 < channels <= MAX_CHANNELS:
            raise Rejected("audio_decode_error", f"the header claims {channels} channels at "
                                                 f"{sr} Hz")
        if f.seekable() and 0 < claimed < 2**62 and claimed / sr > cfg.max_s:
            raise Rejected("audio_too_long", f"the header says {claimed / sr:.3f} s > "
                                             f"{cfg.max_s} s")
        frames = int(math.ceil(cfg.max_s * sr)) + 1  # one past max_s: enough to say "too long"
        if frames * channels * 4 > max_decoded:
            raise Rejected("audio_too_large", f"{cfg.max_s} s of {channels} channels at {sr} Hz "
                                              f"decode to {frames * channels * 4 / 2**20:.0f} MiB > "
                                              f"{max_decoded / 2**20:.0f} MiB "
                                              "(limits.audio_max_decoded_mb)")
        # soundfile allocates min(frames, what the header says is left) and reads into it; a
        # header that lies downwards only means a short read.
        x = f.read(frames, dtype="float32", always_2d=True)
    return x, sr, channels


MAX_SOURCE_RATE = 768_000  # Hz: the highest rate any audio format in use writes
MAX_CHANNELS = 64
DEFAULT_DECODED_BYTES = 256 * 2**20  # limits.audio_max_decoded_mb's default


def load_audio(data: bytes, cfg: AudioConfig = AudioConfig(),
               max_decoded: int = DEFAULT_DECODED_BYTES) -> Audio:
    """Decode, mix to mono, resample; raises Rejected for unusable or out-of-bounds audio.
    Never decodes more than `cfg.max_s` (and a frame), nor more than `max_decoded` bytes."""
    if not data:
        raise Rejected("empty_file", "zero-byte audio")
    try:
        x, sr, channels = _read_bounded(data, cfg, max_decoded)
        x = resample(x.mean(axis=1), sr, cfg.sample_rate)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        # AAC/m4a and other containers
        x, sr, channels = _ffmpeg_decode(data, cfg.sample_rate, cfg.max_s)
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
