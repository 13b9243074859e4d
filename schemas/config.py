"""The corpus config: which sources to ingest, and how to shard them.

Loaded from YAML, validated at load, and saved next to the build it produced. Relative paths
are resolved against the config file's folder, so a config and its data can move together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.dedupe import DedupeConfig
from schemas.params import LimitsConfig, TransformSettings

Kind = Literal["caption", "qa", "ocr", "video", "text", "asr", "tts_pair"]
Format = Literal["llava", "vita", "asr_jsonl", "librispeech", "text_lines", "messages",
                 "aishell", "transcript_dir", "parquet", "webdataset"]
Preset = Literal["llava", "cauldron", "syndog", "hf_audio"]

# Which input formats make sense for which kind of source.
_FORMATS_FOR_KIND: dict[str, tuple[str, ...]] = {
    "caption": ("llava", "vita", "messages", "parquet", "webdataset"),
    "qa": ("llava", "vita", "messages", "parquet"),
    "ocr": ("llava", "vita", "messages", "parquet"),
    "video": ("llava", "vita", "messages", "webdataset"),
    "text": ("llava", "vita", "messages", "parquet"),
    "asr": ("asr_jsonl", "librispeech", "aishell", "transcript_dir", "parquet"),
    "tts_pair": ("text_lines", "llava", "vita"),  # text to speak: a line, or the first answer
}

# What each parquet preset reads: role -> column (`columns` in a source renames any of them).
PRESET_COLUMNS: dict[str, dict[str, str]] = {
    "llava": {"id": "id", "image": "image", "video": "video", "conversations": "conversations"},
    "cauldron": {"id": "id", "images": "images", "texts": "texts"},
    "syndog": {"id": "id", "image": "image", "ground_truth": "ground_truth"},
    "hf_audio": {"id": "id", "audio": "audio", "text": "text|sentence|transcription"},
}
_PRESET_FOR_KIND = {"caption": ("llava", "cauldron"), "qa": ("llava", "cauldron"),
                    "ocr": ("llava", "cauldron", "syndog"), "text": ("llava", "cauldron"),
                    "asr": ("hf_audio",)}

# LLaVA's short caption instructions: the human turn of a caption record read from a
# WebDataset (one chosen per record by a seeded hash of its id; meta.prompt says which).
DEFAULT_CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
)
DEFAULT_VIDEO_PROMPTS = (
    "Describe the video concisely.",
    "Provide a brief description of the given video.",
    "Summarize the visual content of the video.",
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="short name; used in shard names")
    kind: Kind
    format: Format
    path: str = Field(description="input file (JSON / JSONL), folder (librispeech, aishell, "
                                  "transcript_dir) or file, folder or pattern (parquet, webdataset)")
    media_root: str | None = Field(
        default=None, description="folder media paths are relative to (default: the input's folder)"
    )
    language: str = Field(default="auto", description="en, zh, ... or auto (detect from text)")
    licence: str | None = None
    asr_prompt: str = Field(
        default="Transcribe the speech into text.",
        description="the human turn's text for ASR pairs (after the <audio> placeholder)",
    )
    preset: Preset | None = Field(
        default=None, description="parquet: the layout of the rows (llava | cauldron | syndog | "
                                  "hf_audio); default llava, hf_audio for asr")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="parquet: role -> column, over the preset's (id, image, images, video, "
                    "audio, conversations, texts, ground_truth, text; `a|b` tries a then b)")
    ocr_prompt: str = Field(default="Read all the text in the image.",
                            description="parquet syndog: the question of the OCR pair")
    prompts: list[str] | None = Field(
        default=None, min_length=1,
        description="webdataset: caption instructions, one drawn per record (seeded); default "
                    "LLaVA's short caption prompts")
    prompt_seed: int = Field(default=0, description="the seed of the caption prompt choice")
    transcript: str | None = Field(
        default=None, description="aishell / transcript_dir: the `id text` file, relative to "
                                  "path (aishell default: transcript/aishell_transcript_v0.8.txt)")
    audio_ext: list[str] = Field(default=[".wav", ".flac"], min_length=1,
                                 description="aishell / transcript_dir: audio file extensions")

    @model_validator(mode="after")
    def _format_fits_kind(self) -> SourceConfig:
        allowed = _FORMATS_FOR_KIND[self.kind]
        if self.format not in allowed:
            raise ValueError(
                f"format {self.format!r} does not fit kind {self.kind!r}; use one of {list(allowed)}"
            )
        if self.format == "parquet":
            if self.preset is None:
                self.preset = "hf_audio" if self.kind == "asr" else "llava"
            fits = _PRESET_FOR_KIND.get(self.kind, ())
            if self.preset not in fits:
                raise ValueError(f"preset {self.preset!r} does not fit kind {self.kind!r}; use "
                                 f"one of {list(fits)}")
            unknown = sorted(set(self.columns) - set(PRESET_COLUMNS[self.preset]))
            if unknown:
                raise ValueError(f"columns {unknown} are not roles of preset {self.preset!r}; "
                                 f"its roles: {sorted(PRESET_COLUMNS[self.preset])}")
        elif self.preset is not None or self.columns:
            raise ValueError("`preset` and `columns` are for format parquet")
        if self.format == "transcript_dir" and not self.transcript:
            raise ValueError("format transcript_dir needs `transcript`: the `id text` file "
                             "relative to path")
        return self

    def column_map(self) -> dict[str, str]:
        """role -> column(s) for a parquet source: the preset's, with `columns` over it."""
        assert self.preset is not None
        return {**PRESET_COLUMNS[self.preset], **self.columns}

    def caption_prompts(self) -> list[str]:
        if self.prompts is not None:
            return list(self.prompts)
        return list(DEFAULT_VIDEO_PROMPTS if self.kind == "video" else DEFAULT_CAPTION_PROMPTS)


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_samples: int = Field(default=1000, ge=1, description="samples per shard at most")
    max_bytes: int = Field(default=256 * 2**20, ge=1, description="shard size target in bytes")


class MediaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_image_pixels: int = Field(
        default=100_000_000, ge=1, description="larger headers are decompression bombs"
    )


class SampleConfig(BaseModel):
    """What a sample may be (schemas.contract holds the rules the ingest and the gate share)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(
        default=None, ge=1,
        description="longest sample in estimated tokens (all modalities, as the report counts "
                    "them); null: the longest stage's max_len")


class ReportConfig(BaseModel):
    """The morning view (flows.report.mix): where builds are recorded, how many samples it shows."""

    model_config = ConfigDict(extra="forbid")

    history: str | None = Field(
        default=None, description="build history (JSON Lines), a path or URI; relative paths are "
                                  "relative to OUT; default OUT/report/history.jsonl. Point builds "
                                  "into dated OUT folders at one file to see them side by side")
    gallery_samples: int = Field(default=4, ge=0, le=50,
                                 description="samples shown per stage in the report's gallery")


class CorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "corpus"
    seed: int = 1234
    shard: ShardConfig = ShardConfig()
    media: MediaConfig = MediaConfig()
    limits: LimitsConfig = LimitsConfig()  # what one input may cost (storage.guard, transforms)
    sample: SampleConfig = SampleConfig()
    transforms: TransformSettings = TransformSettings()
    report: ReportConfig = ReportConfig()
    dedupe: DedupeConfig = DedupeConfig()  # duplicates by content, benchmark leaks
    sources: list[SourceConfig]

    @model_validator(mode="after")
    def _unique_names(self) -> CorpusConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        return self

    def fingerprint(self) -> str:
        """A stable hash of everything that changes what a build writes."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


def _format_error(err: ValidationError, where: str) -> str:
    lines = [f"invalid corpus config {where}:"]
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        value = e.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
        lines.append(f"  {loc or '<root>'}: {e['msg']}{shown}")
    return "\n".join(lines)


def _resolve(path: str, base: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base / path).resolve())


_PATTERNED = ("parquet", "webdataset")  # formats whose path may be a glob or brace pattern


def pattern_base(path: str) -> str:
    """The folder above the first glob or brace character of `path` (`path` when it has none)."""
    cut = min((i for i, c in enumerate(path) if c in "*?[{"), default=None)
    if cut is None:
        return path
    head = path[:cut]
    return head[: head.rfind("/") + 1] or "."


def _exists(path: str) -> bool:
    if "://" in path:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return Path(path).exists()


def load_config(path: str | Path) -> CorpusConfig:
    """Load and validate a corpus config; raise ConfigError naming the bad field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"corpus config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"corpus config {path} is not valid YAML: {err}") from None
    return config_from_dict(data, base=path.parent, where=str(path))


def config_from_dict(
    data: Any, base: str | Path = ".", where: str = "<dict>", check_paths: bool = True
) -> CorpusConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"corpus config {where} must be a mapping with a `sources` list")
    try:
        cfg = CorpusConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, where)) from None
    base = Path(base).resolve()
    for i, src in enumerate(cfg.sources):
        src.path = _resolve(src.path, base)
        if src.media_root is not None:
            src.media_root = _resolve(src.media_root, base)
        if check_paths:
            if not _exists(pattern_base(src.path) if src.format in _PATTERNED else src.path):
                raise ConfigError(
                    f"invalid corpus config {where}:\n  sources[{i}].path: "
                    f"{src.path} does not exist (source {src.name!r})"
                )
            if src.media_root is not None and not _exists(src.media_root):
                raise ConfigError(
                    f"invalid corpus config {where}:\n  sources[{i}].media_root: "
                    f"{src.media_root} does not exist (source {src.name!r})"
                )
    names = [b.name for b in cfg.dedupe.benchmarks]
    if len(set(names)) != len(names):
        raise ConfigError(f"invalid corpus config {where}:\n  dedupe.benchmarks: names must be "
                          f"unique, got {names}")
    for i, bench in enumerate(cfg.dedupe.benchmarks):
        bench.path = _resolve(bench.path, base)
        if check_paths and not _exists(bench.path):
            raise ConfigError(f"invalid corpus config {where}:\n  dedupe.benchmarks[{i}].path: "
                              f"{bench.path} does not exist (benchmark {bench.name!r})")
    return cfg


def dump_config(cfg: CorpusConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
