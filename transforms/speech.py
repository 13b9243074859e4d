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
from collections.abc import Iterator
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

    _ready: dict[str, Speech | Rejected] = field(default_factory=dict, repr=False)

    def speak(self, text: str, voice: Voice, sample_rate: int) -> Speech:
        """Raises Rejected when nothing usable comes."""
        if not text.strip():
            raise Rejected("empty_text", "nothing to speak")
        key = cache_key(self.backend, voice, sample_rate, text)
        if key in self._ready:  # spoken ahead by `prefetch`
            # (kept for a repeat in the same samples where the cache cannot serve it)
            got = self._ready[key] if self.batched else self._ready.pop(key)
            if isinstance(got, Rejected):
                raise got
            return got
        hit = self._cached(key, sample_rate)
        if hit is not None:
            return hit
        return self._finish(key, sample_rate, self._timed(self.backend.synthesize, text, voice))

    @property
    def batched(self) -> bool:
        """A backend that speaks several sentences a call (coqui with speech.batch > 1): a
        sentence's last milliseconds depend on its batch, so its audio is not a function of
        the cache key, and two workers could cache different audio under one key. Such a
        backend's audio comes from the batch its stage plan makes, and the cache is not used."""
        return getattr(self.backend, "batch", 1) > 1

    def prefetch(self, jobs: list[tuple[str, Voice]], sample_rate: int) -> None:
        """Speak the cache misses among `jobs` ahead of the `speak` calls that will ask for them,
        through the backend's `synthesize_many` where it has one (espeak-ng's helper: several
        sentences in flight, so it speaks the next while this process encodes the last, the
        same audio as one by one; coqui with speech.batch: padded batches of these jobs)."""
        jobs_by_key: dict[str, tuple[str, Voice]] = {}
        for text, voice in jobs:
            if text.strip():
                jobs_by_key.setdefault(cache_key(self.backend, voice, sample_rate, text),
                                       (text, voice))
        todo = {}
        for key, job in jobs_by_key.items():
            if key in self._ready:
                continue
            hit = self._cached(key, sample_rate)
            if hit is not None:
                self._ready[key] = hit
            else:
                todo[key] = job
        many = getattr(self.backend, "synthesize_many", None)
        if many is None or len(todo) < 2 and not self.batched:
            for key, (text, voice) in todo.items():
                self._ready[key] = self._attempt(key, sample_rate, self.backend.synthesize,
                                                 text, voice)
            return
        import time

        t0 = time.perf_counter()
        results = many(list(todo.values()))
        for key in todo:
            t1 = time.perf_counter()
            wav = next(results)
            self.seconds += t1 - t0  # the wait for this one; what follows is this process's
            self.calls += 1
            self._ready[key] = wav if isinstance(wav, Rejected) else \
                self._attempt(key, sample_rate, lambda w: w, wav, count=False)
            t0 = time.perf_counter()

    def forget(self) -> None:
        """Drop what `prefetch` spoke and no `speak` took (a sample dropped later)."""
        self._ready.clear()

    def _attempt(self, key: str, sample_rate: int, fn: Any, *args: Any,
                 count: bool = True) -> Speech | Rejected:
        try:
            wav = self._timed(fn, *args) if count else fn(*args)
            return self._finish(key, sample_rate, wav)
        except Rejected as err:
            return err

    def _timed(self, fn: Any, *args: Any) -> np.ndarray:
        import time

        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def _cached(self, key: str, sample_rate: int) -> Speech | None:
        path = None if self.batched else self._path(key)
        if path is not None and uri.exists(path):
            data = uri.read_bytes(path)
            try:
                wav, rate = sf.read(io.BytesIO(data), dtype="float32")
            except (sf.LibsndfileError, RuntimeError):
                rate = 0  # damaged (a copy cut short): spoken again and replaced
            if rate == sample_rate:
                self.hits += 1
                return Speech(key, data, wav, wav.size / sample_rate)
        return None

    def _path(self, key: str) -> str | None:
        return uri.join(self.cache_dir, key[:2], f"{key}.flac") if self.cache_dir else None

    def _finish(self, key: str, sample_rate: int, wav: np.ndarray) -> Speech:
        """The backend's samples -> what is stored (resampled, 16-bit FLAC) and cached."""
        if wav.size == 0 or not np.all(np.isfinite(wav)) or float(np.max(np.abs(wav))) < 1e-4:
            raise Rejected("tts_failed", f"{self.backend.name} returned no audible audio")
        self.audio_s += wav.size / self.backend.sample_rate
        wav = np.clip(resample_speech(wav, self.backend.sample_rate, sample_rate), -1, 1)
        buf = io.BytesIO()
        pcm = pcm16(wav) if _pcm16_as_libsndfile() else None
        sf.write(buf, wav if pcm is None else pcm, sample_rate, format="FLAC", subtype="PCM_16")
        data = buf.getvalue()
        path = None if self.batched else self._path(key)
        if path is not None:
            # Many workers may write one entry at once: each writes a temporary file of its own
            # and renames it into place; the entries are the same bytes (the audio depends on
            # the key's inputs alone), so whichever rename comes last leaves a whole entry.
            uri.write_bytes_atomic(path, data)
        # The gate sees what is stored (16-bit), so a cache hit gets the same verdict: the
        # stored integers as libsndfile reads them back, without decoding the FLAC again.
        if pcm is not None:
            wav = pcm.astype(np.float32) / np.float32(32768)
        else:
            wav, _ = sf.read(io.BytesIO(data), dtype="float32")
        return Speech(key, data, wav, wav.size / sample_rate)


def pcm16(wav: np.ndarray) -> np.ndarray:
    """float samples -> the int16 that libsndfile (1.2) stores for them as PCM_16: scaled by
    32768, rounded half to even, +1.0 clipped to 32767."""
    x = np.asarray(wav, dtype=np.float32) * np.float32(32768)
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


@functools.lru_cache(maxsize=1)
def _pcm16_as_libsndfile() -> bool:
    """Whether `pcm16` gives libsndfile's integers here (checked once per process on values
    that tell its conventions apart); where not, the float samples go to libsndfile and the
    gate decodes what it stored, as before."""
    probe = np.concatenate([(np.arange(-300, 300, dtype=np.float32) + 0.5) / 32768,
                            np.float32([1.0, -1.0, 0.99999, -0.99999, 1 / 65536, 0.3, -0.7]),
                            np.linspace(-1, 1, 4001, dtype=np.float32)])
    buf = io.BytesIO()
    sf.write(buf, probe, 16000, format="FLAC", subtype="PCM_16")
    stored, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="int16")
    back, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
    q = pcm16(probe)
    return bool(np.array_equal(stored, q)
                and np.array_equal(back, q.astype(np.float32) / np.float32(32768)))


@dataclass
class SpeechResult:
    members: list[tuple[str, bytes]] = field(default_factory=list)
    spoken: list[dict[str, Any]] = field(default_factory=list)
    typed: int = 0  # questions the coin left as text
    kept: Counter[str] = field(default_factory=Counter)  # chosen but kept as text, by reason


def _chosen(record: Record, cfg: SpeechConfig, seed: int, voices: list[Voice]
            ) -> Iterator[tuple[int, Any, str, Voice | str]]:
    """(turn index, turn, text, the voice or the reason it stays text) per human question."""
    lang = record.meta.language
    for i, turn in enumerate(record.conversations):
        if turn.from_ != "human":
            continue
        text = question_text(turn.value)
        if not text:
            yield i, turn, text, "empty_text"
        elif coin(seed, record.id, i) >= cfg.fraction:
            yield i, turn, text, "typed"
        elif not voices:
            yield i, turn, text, "no_voice"  # a Chinese question read by an English voice is garbage
        elif not speakable(text, lang):
            yield i, turn, text, "unspeakable"
        elif len(text) > cfg.max_chars:
            yield i, turn, text, "too_long"
        else:
            yield i, turn, text, pick(seed, record.id, i, voices)


def planned_speech(record: Record, cfg: SpeechConfig, seed: int, backend: TTSBackend
                   ) -> list[tuple[str, Voice]]:
    """The (text, voice) pairs `speak_questions` will ask for, in its order (for `prefetch`)."""
    if record.audio:
        return []
    voices = backend.voices(record.meta.language)
    return [(text, v) for _, _, text, v in _chosen(record, cfg, seed, voices)
            if isinstance(v, Voice)]


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
    for i, turn, text, voice in _chosen(record, cfg, seed, voices):
        if voice == "typed":
            res.typed += 1
            continue
        if not isinstance(voice, Voice):
            res.kept[voice] += 1
            continue
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
