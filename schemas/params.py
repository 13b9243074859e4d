"""Transform parameters: tiling, video frames, audio. Validated at construction, recorded in meta.

They live in schemas (not in transforms) so that loading a config does not import the heavy
decoding libraries; the transforms take them as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)


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


class SpeechGateConfig(BaseModel):
    """Checks on every synthesized question before it replaces the text (transforms.speech_gate);
    a question that fails stays text, counted by the failed check."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Seconds of speech (first to last speech frame) per letter/digit, per language: espeak's
    # voices run 0.05-0.09 (English sentences) and 0.2-0.37 (Chinese); a lone word runs slower.
    s_per_char: dict[str, tuple[float, float]] = {"en": (0.03, 0.2), "zh": (0.1, 0.6)}
    other_s_per_char: tuple[float, float] = (0.02, 0.6)  # languages not in s_per_char
    slack_s: float = Field(default=0.25, ge=0)  # added to both bounds (short questions)
    silence_dbfs: float = -45.0  # a 20 ms frame quieter than this is silence
    min_active: float = Field(default=0.3, ge=0, le=1)  # least share of frames above it
    max_clipped: float = Field(default=0.001, ge=0, le=1)  # most share of samples at full scale
    level_dbfs: tuple[float, float] = (-35.0, -3.0)  # RMS of the speech frames
    asr_check_path: str | None = None  # a local transformers Whisper folder: ASR round trip
    asr_max_error: float = Field(default=0.5, ge=0)  # WER (CER for zh/ja/ko) above this fails
    asr_device: str = "cpu"

    @field_validator("s_per_char")
    @classmethod
    def _ordered(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for lang, (lo, hi) in v.items():
            if not 0 <= lo < hi:
                raise ValueError(f"speech.gate.s_per_char[{lang}]: need 0 <= low < high, got "
                                 f"{lo}, {hi}")
        return v

    @field_validator("other_s_per_char", "level_dbfs")
    @classmethod
    def _low_high(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"speech.gate.{info.field_name}: need low < high, got {v[0]}, {v[1]}")
        return v


class SpeechConfig(BaseModel):
    """Speech questions (stage 2.2): about half of the human questions become TTS audio."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    kinds: list[str] = ["qa", "ocr", "video", "caption", "text"]  # source kinds it applies to
    fraction: float = Field(default=0.5, ge=0.0, le=1.0)  # share of eligible questions spoken
    seed: int | None = None  # None: the corpus seed
    backend: str = "espeak"  # espeak | coqui | kokoro
    voices: dict[str, list[str]] | None = None  # per language; None: the backend's defaults
    max_chars: int = Field(default=400, ge=1)  # longer questions stay text (counted)
    max_s: float = Field(default=30.0, gt=0)  # so do questions whose audio runs longer
    # ... and shorter (the validation gate refuses audio under audio.min_s); None: audio.min_s
    min_s: float | None = Field(default=None, ge=0)
    sample_rate: int = 16000  # speech input for the audio encoder
    pair_sample_rate: int = 24000  # text-speech pairs (stage-3 targets)
    cache: str | None = None  # synthesis cache folder/URI; None: OUT/cache/tts
    coqui_model_path: str | None = None
    coqui_config_path: str | None = None
    coqui_model_name: str | None = None
    # Question language -> the coqui model's language id (e.g. {zh: zh-cn}); None: matched by
    # name among a multi-lingual model's languages, and `en` for a single-language model.
    coqui_languages: dict[str, str] | None = None
    coqui_threads: int = Field(default=1, ge=0)  # torch threads per backend on the CPU; 0: torch's
    # Sentences per model call where the backend takes a batch (a coqui VITS): padded, each
    # sentence with its own noise seed; 1: one at a time. Batched audio is deterministic but
    # not bit-identical to one at a time (transforms.tts.CoquiBackend.synthesize_many).
    batch: int = Field(default=1, ge=1, le=256)
    # Kokoro-82M (ONNX): the model and voices files on local disk; question language -> espeak
    # language id (None: en -> en-us, zh -> cmn, ...); onnxruntime threads per backend.
    kokoro_model_path: str | None = None
    kokoro_voices_path: str | None = None
    kokoro_languages: dict[str, str] | None = None
    kokoro_threads: int = Field(default=1, ge=0)
    kokoro_speed: float = Field(default=1.0, gt=0.25, le=4.0)
    # Where a neural backend runs: auto (a GPU where the worker has one), cpu, cuda.
    device: str = "auto"
    # The share of a GPU each stage task that speaks with coqui asks Ray for, where it runs on
    # a GPU (device cuda, or auto on a cluster with GPUs): 0.25 puts four TTS workers on a GPU.
    gpu_share: float = Field(default=0.25, gt=0, le=1)
    gate: SpeechGateConfig = SpeechGateConfig()

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError(f"speech.device must be auto, cpu or cuda, got {v!r}")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in ("espeak", "coqui", "kokoro"):
            raise ValueError(f"unknown TTS backend {v!r}; use 'espeak', 'coqui' or 'kokoro'")
        return v

    @model_serializer(mode="wrap")
    def _batch_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict:
        # At its default, `batch` is left out of the dump, so the fingerprints of builds made
        # before it existed (ingest parts and stages hash the speech settings) stay the same.
        out = handler(self)
        if out.get("batch") == 1:
            out.pop("batch")
        return out


MiB = 2**20


class FileLimits(BaseModel):
    """The largest file of each kind that a build opens, in MiB (storage.guard). A file over
    its limit is rejected `file_too_large` from its size alone, before a byte is read, so a
    sparse giant or a file that grows while it is read costs nothing."""

    model_config = ConfigDict(extra="forbid")

    image: float = Field(default=128, gt=0)  # a 100 MP PNG is 100-300 MB; JPEGs far less
    video: float = Field(default=512, gt=0)  # read whole to decode: the worker holds it
    audio: float = Field(default=128, gt=0)  # 30 s of 192 kHz 8-channel float WAV is 176 MiB
    transcript: float = Field(default=16, gt=0)  # a LibriSpeech *.trans.txt is a few kB
    manifest: float = Field(default=256 * 1024, gt=0)  # the source file (streamed): 256 GiB

    def bytes(self, kind: str) -> int:
        return int(getattr(self, kind) * MiB)


class LimitsConfig(BaseModel):
    """What one input may cost the worker that reads it; each limit has its reject reason.
    The defaults keep a worker under 1.5 GB on the worst input (bench/bench_hostile.py)."""

    model_config = ConfigDict(extra="forbid")

    max_file_mb: FileLimits = FileLimits()
    # A JSON element (array element or JSONL line): nesting and size (`json_too_deep`,
    # `element_too_large`). VITA's records nest 4 deep; 64 leaves room for source fields.
    json_max_depth: int = Field(default=64, ge=2, le=900)  # CPython's decoder recurses
    json_max_element_mb: float = Field(default=16, gt=0)
    # Decoded pixels: width x height x channels x bytes per channel (`image_too_large`),
    # checked from the header; a video frame too (`video_too_large`).
    image_max_decoded_mb: float = Field(default=512, gt=0)
    # The container's frame count and duration, checked before the decoder indexes the file
    # (`video_too_long`).
    video_max_frames: int = Field(default=500_000, ge=1)
    video_max_s: float = Field(default=4 * 3600, gt=0)
    # Decoded audio, float32 samples x channels up to audio.max_s (`audio_too_large`).
    audio_max_decoded_mb: float = Field(default=256, gt=0)
    # One parquet row group's column chunks as its footer states them, uncompressed
    # (`row_group_too_large`): what reading one cell can cost at most.
    parquet_max_row_group_mb: float = Field(default=1024, gt=0)

    def decoded_bytes(self, what: str) -> int:
        return int(getattr(self, f"{what}_max_decoded_mb") * MiB)


class TransformSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True  # False: media pass through unchanged (checked, not transformed)
    tiling: TilingConfig = TilingConfig()
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    speech: SpeechConfig = SpeechConfig()

    @model_validator(mode="after")
    def _spoken_audio_passes_the_gate(self) -> TransformSettings:
        if self.speech.min_s is None:
            self.speech.min_s = self.audio.min_s
        elif self.speech.min_s < self.audio.min_s:
            raise ValueError(f"speech.min_s ({self.speech.min_s}) is below audio.min_s "
                             f"({self.audio.min_s}): spoken questions that short would fail the "
                             "validation gate; raise speech.min_s or lower audio.min_s")
        return self
