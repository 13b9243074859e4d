"""The training record: VITA's own JSON, plus our fields under `meta`.

A record keeps VITA's field names (`id`, `set`, `image`, `video`, `audio`, `conversations`) so
that our output can be diffed against VITA's data files; everything we add lives in `meta`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.contract import turn_problem  # the contract the validation gate checks too
from schemas.rejects import Rejected

TASKS = ("caption", "qa", "ocr", "video", "text", "asr", "tts_pair")
Task = Literal["caption", "qa", "ocr", "video", "text", "asr", "tts_pair"]

PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
_PLACEHOLDER_RE = re.compile(r"<(image|video|audio)>")


class Turn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Meta(BaseModel):
    """Our fields. Transform parameters (tile grid, frame times, TTS voice...) are added as extras."""

    model_config = ConfigDict(extra="allow")

    task: Task
    source: str = Field(description="name of the source in the corpus config")
    lineage: str = Field(description="input file and element/line the record came from")
    language: str = Field(description="ISO 639-1 code: en, zh, ...; 'und' when unknown")
    licence: str | None = None


class Record(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    id: str
    set: str
    image: str | list[str] | None = None
    video: str | None = None
    audio: list[str] | None = None
    conversations: list[Turn]
    meta: Meta

    @field_validator("conversations")
    @classmethod
    def _non_empty(cls, v: list[Turn]) -> list[Turn]:
        if not v:
            raise ValueError("conversations is empty")
        return v

    def media(self) -> dict[str, list[str]]:
        """Attached media by kind, each a list of paths in placeholder order."""
        images = [self.image] if isinstance(self.image, str) else list(self.image or [])
        return {
            "image": images,
            "video": [self.video] if self.video else [],
            "audio": list(self.audio or []),
        }

    def placeholder_counts(self) -> dict[str, int]:
        counts = {kind: 0 for kind in PLACEHOLDERS}
        for turn in self.conversations:
            for m in _PLACEHOLDER_RE.finditer(turn.value):
                counts[m.group(1)] += 1
        return counts

    def check_placeholders(self) -> None:
        """Raise `placeholder_mismatch` unless every attached medium has exactly one placeholder."""
        counts = self.placeholder_counts()
        media = self.media()
        bad = [
            f"{len(media[k])} {k} attached but {counts[k]} {PLACEHOLDERS[k]}"
            for k in PLACEHOLDERS
            if counts[k] != len(media[k])
        ]
        if bad:
            raise Rejected("placeholder_mismatch", "; ".join(bad))

    def text(self) -> str:
        return "\n".join(t.value for t in self.conversations)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


def parse_record(data: dict[str, Any]) -> Record:
    """Validate a dict as a Record, turning schema errors into named rejections."""
    try:
        rec = Record.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        head = str(first["loc"][0]) if first["loc"] else ""
        reason = {
            "conversations": "bad_conversations",
            "image": "bad_media_field",
            "video": "bad_media_field",
            "audio": "bad_media_field",
        }.get(head, "bad_record")
        if head == "conversations" and first["type"] == "missing":
            reason = "missing_conversations"
        raise Rejected(reason, f"{loc}: {first['msg']}") from None
    rec.check_placeholders()
    problem = turn_problem((t.from_, t.value) for t in rec.conversations)
    if problem is not None:
        raise Rejected(*problem)
    return rec
