"""A quality gate on synthesized speech: a question is spoken only if its audio passes.

TTS models fail quietly: a VITS checkpoint trained on another language mumbles, a duration
predictor runs away and stretches three words over ten seconds, a loud voice clips, a broken
vocoder returns near-silence. Such audio would teach the audio encoder that noise means the
question text. Every synthesized question is measured before it replaces the text, and one
that fails stays text with the failed check as its reason (a counter in the report):

- `tts_silent`: too few 20 ms frames above the silence floor (no speech, or mostly pauses);
- `tts_clipped`: too many samples at full scale;
- `tts_level`: the level of the speech frames is outside the configured range;
- `tts_too_fast` / `tts_too_slow`: the span from the first to the last speech frame, per
  spoken character, is outside the bounds of the question's language;
- `tts_wer_high`: optionally, a local Whisper model (`asr_check_path`) transcribes the audio
  and the word error rate (character error rate for Chinese, Japanese, Korean) against the
  question text is above `asr_max_error`.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from dataclasses import dataclass

import numpy as np

from schemas.params import SpeechGateConfig
from schemas.rejects import Rejected

FRAME_S = 0.02
CLIP_LEVEL = 0.999  # |x| at or above this is full scale (PCM_16 stores +1.0 as 32767/32768)
# Scripts written without spaces between words: error rates are counted per character.
_CHAR_LANGS = {"zh", "ja", "ko", "th", "yue"}
_WORDISH = re.compile(r"[^\W_]", re.UNICODE)  # letters and digits of any script


@dataclass(frozen=True)
class AudioStats:
    duration_s: float
    speech_s: float  # from the first to the last frame above the silence floor
    active: float  # share of frames above the silence floor
    clipped: float  # share of samples at full scale
    level_dbfs: float  # RMS of the frames above the floor; -inf when there are none


def measure(wav: np.ndarray, sample_rate: int, silence_dbfs: float) -> AudioStats:
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    n = max(1, int(round(FRAME_S * sample_rate)))
    frames = x[: x.size // n * n].reshape(-1, n) if x.size >= n else x.reshape(1, -1)
    if frames.size == 0:
        return AudioStats(0.0, 0.0, 0.0, 0.0, -math.inf)
    power = np.mean(frames**2, axis=1)
    db = 10 * np.log10(np.maximum(power, 1e-20))
    on = db > silence_dbfs
    idx = np.flatnonzero(on)
    speech_s = (idx[-1] - idx[0] + 1) * n / sample_rate if idx.size else 0.0
    level = 10 * math.log10(float(np.mean(power[on]))) if idx.size else -math.inf
    return AudioStats(duration_s=x.size / sample_rate, speech_s=speech_s, active=float(on.mean()),
                      clipped=float(np.mean(np.abs(x) >= CLIP_LEVEL)), level_dbfs=level)


def spoken_chars(text: str) -> int:
    """Letters and digits: what a voice says; spaces and punctuation are at most pauses."""
    return len(_WORDISH.findall(text))


def _tokens(text: str, language: str) -> list[str]:
    norm = unicodedata.normalize("NFKC", text).lower()
    norm = "".join(c if not unicodedata.category(c).startswith(("P", "S")) else " " for c in norm)
    if language.split("-")[0] in _CHAR_LANGS:
        return [c for c in norm if not c.isspace()]
    return norm.split()


def error_rate(reference: str, hypothesis: str, language: str) -> float:
    """Word error rate (character error rate for scripts without spaces) after normalising
    case, width and punctuation; an empty reference scores 0 only for an empty hypothesis."""
    ref, hyp = _tokens(reference, language), _tokens(hypothesis, language)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


class WhisperCheck:
    """A transformers Whisper model from a local folder (nothing is downloaded)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.torch = torch
        try:
            self.processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
            self.model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True)
        except OSError as err:
            raise RuntimeError(
                f"speech gate: asr_check_path {path!r} is not a Whisper folder saved with "
                f"save_pretrained (model and processor): {err}") from None
        self.model.eval().to(device)
        self.device = device
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.lang_to_id = dict(getattr(self.model.generation_config, "lang_to_id", None) or {})

    def transcribe(self, wav: np.ndarray, sample_rate: int, language: str, max_tokens: int) -> str:
        from transforms.audio import resample

        wav = resample(np.asarray(wav, dtype=np.float32), sample_rate, self.sample_rate)
        feats = self.processor(wav, sampling_rate=self.sample_rate, return_tensors="pt").input_features
        kwargs: dict[str, object] = {}
        if f"<|{language}|>" in self.lang_to_id:  # a multilingual checkpoint: no language guessing
            kwargs = {"language": language, "task": "transcribe"}
        limit = int(getattr(self.model.config, "max_target_positions", 448)) // 2
        with self.torch.inference_mode():
            ids = self.model.generate(feats.to(self.device), max_new_tokens=min(max_tokens, limit),
                                      **kwargs)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class SpeechGate:
    """Loads once (the ASR model, when configured); `check` raises Rejected or returns the
    measurements that are kept in the question's metadata."""

    def __init__(self, cfg: SpeechGateConfig) -> None:
        self.cfg = cfg
        self.asr = WhisperCheck(cfg.asr_check_path, cfg.asr_device) if cfg.asr_check_path else None
        self.checks = 0
        self.seconds = 0.0  # wall time spent checking
        self.asr_seconds = 0.0  # of which in the ASR round trip

    def bounds(self, language: str) -> tuple[float, float]:
        b = self.cfg.s_per_char.get(language) or self.cfg.s_per_char.get(language.split("-")[0])
        return tuple(b or self.cfg.other_s_per_char)  # type: ignore[return-value]

    def check(self, wav: np.ndarray, sample_rate: int, text: str, language: str) -> dict[str, float]:
        t0 = time.perf_counter()
        self.checks += 1
        try:
            return self._check(wav, sample_rate, text, language)
        finally:
            self.seconds += time.perf_counter() - t0

    def _check(self, wav: np.ndarray, sample_rate: int, text: str, language: str) -> dict[str, float]:
        c = self.cfg
        st = measure(wav, sample_rate, c.silence_dbfs)
        if st.active < c.min_active:
            raise Rejected("tts_silent", f"{st.active:.0%} of frames above {c.silence_dbfs} dBFS "
                                         f"< {c.min_active:.0%}")
        if st.clipped > c.max_clipped:
            raise Rejected("tts_clipped", f"{st.clipped:.2%} of samples at full scale > "
                                          f"{c.max_clipped:.2%}")
        lo_db, hi_db = c.level_dbfs
        if not lo_db <= st.level_dbfs <= hi_db:
            raise Rejected("tts_level", f"speech level {st.level_dbfs:.1f} dBFS outside "
                                        f"[{lo_db}, {hi_db}]")
        n = max(1, spoken_chars(text))
        lo, hi = self.bounds(language)
        # A fixed slack: a very short question's pace is dominated by its first and last sound.
        if st.speech_s < lo * n - c.slack_s:
            raise Rejected("tts_too_fast", f"{st.speech_s:.2f} s of speech for {n} characters "
                                           f"(< {lo} s each, {language})")
        if st.speech_s > hi * n + c.slack_s:
            raise Rejected("tts_too_slow", f"{st.speech_s:.2f} s of speech for {n} characters "
                                           f"(> {hi} s each, {language})")
        out = {"level_dbfs": round(st.level_dbfs, 1), "s_per_char": round(st.speech_s / n, 4),
               "active": round(st.active, 3)}
        if self.asr is not None:
            t0 = time.perf_counter()
            hyp = self.asr.transcribe(wav, sample_rate, language, max_tokens=4 * n + 8)
            self.asr_seconds += time.perf_counter() - t0
            err = error_rate(text, hyp, language)
            if err > c.asr_max_error:
                raise Rejected("tts_wer_high", f"error rate {err:.2f} > {c.asr_max_error} "
                                               f"(heard {hyp[:120]!r})")
            out["asr_error"] = round(err, 3)
        return out
