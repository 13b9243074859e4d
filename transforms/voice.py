"""What a TTS backend is: a voice (the backend's voice id, rate and language) and the protocol
every backend (transforms.tts, transforms.kokoro) follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Voice:
    backend: str
    name: str  # the backend's voice id, e.g. "en-us+f3" or a coqui speaker ("" if it has none)
    rate: int  # words per minute for espeak; 0 where the backend has no rate
    language: str  # the question's language
    model_language: str = ""  # a multi-lingual model's own id for it (coqui: "zh-cn")

    @property
    def id(self) -> str:
        base = f"{self.name}@{self.rate}" if self.rate else self.name
        if self.model_language:  # a multi-lingual model's voice: the speaker and the language
            return f"{base or 'default'}/{self.model_language}"
        return base or "default"


def parse_voice(backend: str, spec: str, language: str) -> Voice:
    name, _, rate = spec.partition("@")
    return Voice(backend, name, int(rate) if rate else 0, language)


class TTSBackend(Protocol):
    name: str
    model: str  # what identifies the model in the cache key (a path, a version)
    sample_rate: int

    def voices(self, language: str) -> list[Voice]: ...

    def synthesize(self, text: str, voice: Voice) -> np.ndarray: ...
