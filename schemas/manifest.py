"""The per-shard manifest: what a shard holds, what made it, and which inputs it accounts for.

A shard is complete only when its manifest exists: the manifest is written last, after the tar
and the part's rejects were renamed into place, so it doubles as the commit marker on resume.
Its `samples` hold one entry per sample (up to the shard limit); readers that need only the
counts read it with `storage.parts.read_manifest(..., samples=False)`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

MANIFEST_VERSION = 2  # 2: ingest parts are numbered by input range and sub-part


class AccountingError(RuntimeError):
    """inputs != written + rejected: an input was lost or counted twice. Never expected."""


class SampleEntry(BaseModel):
    id: str
    key: str
    index: int = Field(description="position of the input in its source")
    members: list[str] = Field(description="member suffixes, e.g. json, image_00.jpg")
    bytes: int
    language: str = "und"
    task: str = ""
    tokens: int = Field(default=0, description="estimated sequence length, all modalities")
    tiles: list[int] = Field(default_factory=list, description="tiles per image")
    frames: int = Field(default=0, description="video frames")
    audio_s: list[float] = Field(default_factory=list, description="duration of each audio")
    speech: dict[str, Any] | None = Field(
        default=None, description="speech questions: spoken, typed, kept_as_text by reason")
    media_sha256: list[str] = Field(default_factory=list, description="each medium's content "
                                    "hash (sha256 of its bytes): images, video, audio in order")
    phash: list[str] = Field(default_factory=list, description="each image's pHash (hex)")


class ShardManifest(BaseModel):
    manifest_version: int = MANIFEST_VERSION
    stage: str
    source: str
    part: int = Field(description="ingest: the input range (see flows.build.partitions); a stage: the "
                                  "part's number in its source")
    sub: int | None = Field(default=None, description="ingest: the part's number in its range")
    shard: str | None = Field(description="tar file name, None when every input was rejected")
    count: int = Field(description="samples in the tar")
    bytes: int = Field(description="size of the tar file")
    sha256: str | None
    input_start: int = Field(description="first source index this part accounts for")
    input_end: int = Field(description="one past the last source index")
    input_sha256: str = Field(description="hash of the raw inputs in [input_start, input_end)")
    rejected: int
    reject_reasons: dict[str, int]
    rejects_file: str | None
    member_counts: dict[str, int] = Field(description="members by kind: json, image, video, audio")
    config_fingerprint: str
    code_version: str
    samples: list[SampleEntry]

    @property
    def inputs(self) -> int:
        return self.input_end - self.input_start

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), ensure_ascii=False, indent=1) + "\n").encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> ShardManifest:
        return cls.model_validate(json.loads(data))

    def summary(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"samples"})
        d["inputs"] = self.inputs
        return d
