"""Transform parameters: tiling, video frames, audio. Validated at construction, recorded in meta.

They live in schemas (not in transforms) so that loading a config does not import the heavy
decoding libraries; the transforms take them as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class TilingConfig:
    image_size: int = 448  # tile edge in pixels (InternViT's input)
    min_num: int = 1  # fewest tiles in a grid
    max_num: int = 12  # most tiles in a grid (the thumbnail comes on top)
    thumbnail: bool = True  # append the whole image at tile size when the grid has > 1 tile
    jpeg_quality: int = 95  # quality of the stored tile JPEGs
    fast: bool = True  # draft decoding + torch resize; False = the plain PIL reference path

    def __post_init__(self) -> None:
        if not 1 <= self.min_num <= self.max_num:
            raise ValueError(f"tiling: need 1 <= min_num <= max_num, got {self.min_num}, "
                             f"{self.max_num}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"tiling: jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.image_size < 14:
            raise ValueError(f"tiling: image_size {self.image_size} is too small")


@dataclass(frozen=True)
class VideoConfig:
    frame_size: int = 448  # frames are resized/cropped to frame_size x frame_size
    mode: str = "exact"  # exact: the frame shown at each time; keyframe: the nearest keyframe
    jpeg_quality: int = 95
    backend: str = "auto"  # auto (decord, the bundled ffmpeg when decord fails) | decord | ffmpeg

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "keyframe"):
            raise ValueError(f"video: mode must be 'exact' or 'keyframe', got {self.mode!r}")
        if self.backend not in ("auto", "decord", "ffmpeg"):
            raise ValueError(f"video: backend must be auto, decord or ffmpeg, got {self.backend!r}")


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000  # 16 kHz speech input; 24 kHz for stage-3 targets
    min_s: float = 0.5  # VITA drops clips under 0.5 s ...
    max_s: float = 30.0  # ... and over 30 s
    silence_dbfs: float = -60.0  # a clip whose RMS is below this is silence

    def __post_init__(self) -> None:
        if not 0 <= self.min_s < self.max_s:
            raise ValueError(f"audio: need 0 <= min_s < max_s, got {self.min_s}, {self.max_s}")
        if self.sample_rate not in (8000, 16000, 22050, 24000, 44100, 48000):
            raise ValueError(f"audio: unsupported sample_rate {self.sample_rate}; use 16000 or 24000")


class SpeechConfig(BaseModel):
    """Speech questions (stage 2.2): about half of the human questions become TTS audio."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    kinds: list[str] = ["qa", "ocr", "video", "caption", "text"]  # source kinds it applies to
    fraction: float = Field(default=0.5, ge=0.0, le=1.0)  # share of eligible questions spoken
    seed: int | None = None  # None: the corpus seed
    backend: str = "espeak"  # espeak | coqui
    voices: dict[str, list[str]] | None = None  # per language; None: the backend's defaults
    max_chars: int = Field(default=400, ge=1)  # longer questions stay text (counted)
    max_s: float = Field(default=30.0, gt=0)  # so do questions whose audio runs longer
    sample_rate: int = 16000  # speech input for the audio encoder
    pair_sample_rate: int = 24000  # text-speech pairs (stage-3 targets)
    cache: str | None = None  # synthesis cache folder/URI; None: OUT/cache/tts
    coqui_model_path: str | None = None
    coqui_config_path: str | None = None
    coqui_model_name: str | None = None

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in ("espeak", "coqui"):
            raise ValueError(f"unknown TTS backend {v!r}; use 'espeak' or 'coqui'")
        return v


class TransformSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True  # False: media pass through unchanged (checked, not transformed)
    tiling: TilingConfig = TilingConfig()
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    speech: SpeechConfig = SpeechConfig()
