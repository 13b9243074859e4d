"""Speech questions (stage 2.2) and text-speech pairs (stage 3), with a synthesis cache.

A question is spoken when a deterministic coin says so: sha256 of (seed, sample id, turn)
below `fraction`. The same seed and inputs always choose the same questions and voices, so a
rebuild reproduces its samples, and the cache (keyed by backend, model, voice, rate and text)
means it does not synthesise them again. Before a question's audio replaces its text, the
quality gate (transforms.speech_gate) measures it; a failure keeps the text, with its reason.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf

from schemas.params import SpeechConfig
from schemas.record import Record
from schemas.rejects import Rejected
from storage import uri
from transforms.speech_gate import SpeechGate
from transforms.tts import TTSBackend, Voice, speakable

_PLACEHOLDER = re.compile(r"<(?:image|video|audio)>\s*")


def coin(seed: int, record_id: str, turn: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, id, turn)."""
    h = hashlib.sha256(f"{seed}\0{record_id}\0{turn}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def pick(seed: int, record_id: str, turn: int, options: list[Voice]) -> Voice:
    h = hashlib.sha256(f"voice\0{seed}\0{record_id}\0{turn}".encode()).digest()
    return options[int.from_bytes(h[:8], "big") % len(options)]


def question_text(value: str) -> str:
    """The words of a human turn, without its media placeholders."""
    return _PLACEHOLDER.sub("", value).strip()


@functools.lru_cache(maxsize=8)
def _lowpass(up: int, down: int, dtype: str) -> np.ndarray:
    """The filter scipy's resample_poly designs for (up, down) with its default window."""
    from scipy.signal import firwin

    top = max(up, down)
    return np.asarray(firwin(2 * 10 * top + 1, 1.0 / top, window=("kaiser", 5.0)), dtype=dtype)


def resample_speech(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """transforms.audio.resample, the same samples, with the filter designed once per rate
    pair instead of per sentence (about a millisecond a sentence at 22.05 -> 16 kHz)."""
    if src == dst:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(src, dst)
    up, down = dst // g, src // g
    # a copy: resample_poly scales the filter it is given in place
    h = _lowpass(up, down, x.dtype.str).copy()
    return resample_poly(x, up, down, window=h).astype(np.float32)


def cache_key(backend: TTSBackend, voice: Voice, sample_rate: int, text: str) -> str:
    blob = "\0".join([backend.name, backend.model, voice.id, str(sample_rate), text])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Speech:
    key: str  # the cache key, also the name in the record's `audio` list
    flac: bytes  # what is stored: 16-bit FLAC
    wav: np.ndarray  # the same samples as float32, for the quality gate
    duration_s: float


@dataclass
class Synthesizer:
    """A backend plus the cache (`speak` synthesises a (voice, text) once), and the quality
    gate that speech questions must pass (None: no gate)."""

    backend: TTSBackend
    cache_dir: str | None
    gate: SpeechGate | None = None
    calls: int = 0  # synthesis calls that reached the backend (cache misses)
    hits: int = 0
    seconds: float = 0.0  # wall time spent in the backend
    audio_s: float = 0.0  # audio produced by the backend

    def speak(self, text: str, voice: Voice, sample_rate: int) -> Speech:
        """Raises Rejected when nothing usable comes."""
        import time

        if not text.strip():
            raise Rejected("empty_text", "nothing to speak")
        key = cache_key(self.backend, voice, sample_rate, text)
        path = uri.join(self.cache_dir, key[:2], f"{key}.flac") if self.cache_dir else None
        if path is not None and uri.exists(path):
            data = uri.read_bytes(path)
            try:
                wav, rate = sf.read(io.BytesIO(data), dtype="float32")
            except (sf.LibsndfileError, RuntimeError):
                rate = 0  # damaged (a copy cut short): spoken again and replaced below
            if rate == sample_rate:
                self.hits += 1
                return Speech(key, data, wav, wav.size / sample_rate)
        t0 = time.perf_counter()
        wav = self.backend.synthesize(text, voice)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        if wav.size == 0 or not np.all(np.isfinite(wav)) or float(np.max(np.abs(wav))) < 1e-4:
            raise Rejected("tts_failed", f"{self.backend.name} returned no audible audio")
        self.audio_s += wav.size / self.backend.sample_rate
        wav = np.clip(resample_speech(wav, self.backend.sample_rate, sample_rate), -1, 1)
        buf = io.BytesIO()
        sf.write(buf, wav, sample_rate, format="FLAC", subtype="PCM_16")
        data = buf.getvalue()
        if path is not None:
            # Many workers may write one entry at once: each writes a temporary file of its own
            # and renames it into place; the entries are the same bytes (the audio depends on
            # the key's inputs alone), so whichever rename comes last leaves a whole entry.
            uri.write_bytes_atomic(path, data)
        # The gate sees what is stored (16-bit, decoded), so a cache hit gets the same verdict.
        wav, _ = sf.read(io.BytesIO(data), dtype="float32")
        return Speech(key, data, wav, wav.size / sample_rate)


@dataclass
class SpeechResult:
    members: list[tuple[str, bytes]] = field(default_factory=list)
    spoken: list[dict[str, Any]] = field(default_factory=list)
    typed: int = 0  # questions the coin left as text
    kept: Counter[str] = field(default_factory=Counter)  # chosen but kept as text, by reason


def speak_questions(record: Record, cfg: SpeechConfig, seed: int, synth: Synthesizer) -> SpeechResult:
    """Turn the chosen human questions of `record` into `<audio>`; mutates the record."""
    res = SpeechResult()
    if record.audio:
        # Existing audio placeholders fix the order of the audio list; leave such records be.
        res.kept["has_audio"] += sum(1 for t in record.conversations if t.from_ == "human")
        return res
    lang = record.meta.language
    voices = synth.backend.voices(lang)
    audio: list[str] = []
    for i, turn in enumerate(record.conversations):
        if turn.from_ != "human":
            continue
        text = question_text(turn.value)
        if not text:
            res.kept["empty_text"] += 1
            continue
        if coin(seed, record.id, i) >= cfg.fraction:
            res.typed += 1
            continue
        if not voices:
            res.kept["no_voice"] += 1  # a Chinese question read by an English voice is garbage
            continue
        if not speakable(text, lang):
            res.kept["unspeakable"] += 1
            continue
        if len(text) > cfg.max_chars:
            res.kept["too_long"] += 1
            continue
        voice = pick(seed, record.id, i, voices)
        try:
            speech = synth.speak(text, voice, cfg.sample_rate)
            if speech.duration_s > cfg.max_s:
                res.kept["too_long"] += 1
                continue
            if speech.duration_s < (cfg.min_s or 0.0):  # the gate would refuse it
                res.kept["too_short"] += 1
                continue
            checks = synth.gate.check(speech.wav, cfg.sample_rate, text, lang) if synth.gate else None
        except Rejected as err:  # a backend failure, or a gate check (tts_silent, tts_too_fast ...)
            res.kept[err.reason] += 1
            continue
        key, flac, dur = speech.key, speech.flac, speech.duration_s
        prefix = "".join(m.group(0).strip() + "\n" for m in _PLACEHOLDER.finditer(turn.value))
        turn.value = f"{prefix}<audio>\n"
        member = f"audio_{len(audio):02d}.flac"
        audio.append(f"tts/{key}.flac")
        res.members.append((member, flac))
        res.spoken.append({"turn": i, "text": text, "voice": voice.id, "backend": voice.backend,
                           "model": synth.backend.model, "seed": seed, "member": member,
                           "duration_s": round(dur, 3), **({"gate": checks} if checks else {})})
    if audio:
        record.audio = audio
    return res


def speech_meta(res: SpeechResult) -> dict[str, Any]:
    return {"spoken": len(res.spoken), "typed": res.typed, "kept_as_text": dict(res.kept),
            "questions": res.spoken}


def tts_pair(record: Record, text: str, cfg: SpeechConfig, seed: int, synth: Synthesizer
             ) -> tuple[bytes, dict[str, Any]]:
    """A stage-3 text-speech pair: `text` spoken at `pair_sample_rate`; mutates the record."""
    text = text.strip()
    if not text:
        raise Rejected("empty_text", "the text of a text-speech pair is empty")
    lang = record.meta.language
    voices = synth.backend.voices(lang)
    if not voices:
        raise Rejected("tts_failed", f"no voice configured for language {lang!r}")
    if not speakable(text, lang):
        raise Rejected("tts_failed", f"no {lang} voice can read this text")
    if len(text) > cfg.max_chars:
        raise Rejected("tts_failed", f"{len(text)} characters > max_chars {cfg.max_chars}")
    voice = pick(seed, record.id, 0, voices)
    speech = synth.speak(text, voice, cfg.pair_sample_rate)
    key, flac, dur = speech.key, speech.flac, speech.duration_s
    if dur > cfg.max_s:
        raise Rejected("audio_too_long", f"{dur:.1f} s > {cfg.max_s} s")
    record.audio = [f"tts/{key}.flac"]
    return flac, {"text": text, "voice": voice.id, "backend": voice.backend,
                  "model": synth.backend.model, "seed": seed, "duration_s": round(dur, 3),
                  "sample_rate": cfg.pair_sample_rate}
