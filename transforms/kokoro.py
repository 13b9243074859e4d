"""Kokoro-82M, a pretrained neural voice, through kokoro-onnx and onnxruntime.

The model and the voice styles come from local files the user names (nothing is downloaded):
the official `kokoro-v1.0.onnx` / `kokoro-v1.0.int8.onnx` and a voices file (an .npz or the
official `voices-v1.0.bin`, which is one too: a (510, 1, 256) style array per voice name).
Text becomes phonemes through espeak-ng (kokoro-onnx drives the same espeakng-loader library
the espeak backend uses), so the language a question is read in is an espeak language id:
`en` -> `en-us`, `zh` -> `cmn` by default.

A voice is a (voice name, language) pair. By default the voices of a language are those whose
name starts with Kokoro's language letter (`a`/`b` English, `z` Mandarin, `j` Japanese, ...);
`voices` names them instead, so a voice file of one language can still read another. A
question in a language with no voice stays text (`no_voice`), as with the other backends.

One sequence a call: the v1.0 export takes tokens of shape (1, n) and one style (1, 256), so
sentences cannot be batched into one call; a worker runs one session with `threads` intra-op
threads (1 by default: the build runs a backend per core).
"""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np

from schemas.rejects import Rejected
from transforms.voice import Voice

SAMPLE_RATE = 24000
# Question language -> espeak-ng's language id for Kokoro's phonemes.
DEFAULT_LANGUAGES = {"en": "en-us", "zh": "cmn", "ja": "ja", "fr": "fr-fr", "es": "es",
                     "it": "it", "pt": "pt-br", "hi": "hi"}
# Kokoro names voices by a language letter then a gender letter: af_heart, zf_xiaobei, jm_kumo.
VOICE_LETTER = {"en": ("a", "b"), "zh": ("z",), "ja": ("j",), "es": ("e",), "fr": ("f",),
                "hi": ("h",), "it": ("i",), "pt": ("p",)}


def _file_id(path: str) -> str:
    """Size and the sha256 of the first MiB: tells model files apart without reading 90 MB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return f"{os.path.getsize(path)}:{h.hexdigest()[:16]}"


class KokoroBackend:
    """Kokoro-82M on onnxruntime: CPU by default, CUDA when asked for and present."""

    name = "kokoro"
    sample_rate = SAMPLE_RATE
    _lock = threading.Lock()  # one session run at a time per process (threads are per session)

    def __init__(self, model_path: str | None, voices_path: str | None,
                 voices: dict[str, list[str]] | None = None,
                 languages: dict[str, str] | None = None, device: str = "cpu",
                 threads: int = 1, speed: float = 1.0) -> None:
        if not model_path or not voices_path:
            raise ValueError("the kokoro backend needs speech.kokoro_model_path (the .onnx model) "
                             "and speech.kokoro_voices_path (the voices .npz/.bin file)")
        for what, path in (("model", model_path), ("voices", voices_path)):
            if not os.path.isfile(path):
                raise ValueError(f"kokoro: the {what} file {path} does not exist (point "
                                 f"speech.kokoro_{what}_path at a local file; `make kokoro-model` "
                                 "puts a model and voices in .models/kokoro/)")
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"kokoro: device must be cpu, cuda or auto, got {device!r}")
        try:
            import onnxruntime as rt
            from kokoro_onnx import Kokoro
        except Exception as err:  # ImportError, or a broken optional dependency underneath
            raise RuntimeError("the kokoro backend needs the optional extra: pip install "
                               f"'vita-corpus[kokoro]' (import failed: {type(err).__name__}: "
                               f"{err})") from None
        available = rt.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise ValueError("kokoro: speech.device is cuda but this onnxruntime has no CUDA "
                             f"provider (it has {available}); install onnxruntime-gpu")
        use_cuda = device in ("cuda", "auto") and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        opts = rt.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        session = rt.InferenceSession(model_path, sess_options=opts, providers=providers)
        self.kokoro = Kokoro.from_session(session, voices_path)
        self.device = "cuda" if use_cuda else "cpu"
        self.speed = speed
        self.voice_names = sorted(str(k) for k in self.kokoro.voices.keys())
        self.voice_specs = voices
        self.language_map = {**DEFAULT_LANGUAGES, **(languages or {})}
        self.model = f"kokoro:{_file_id(model_path)}:{_file_id(voices_path)}:speed={speed}"
        for lang, names in (voices or {}).items():
            missing = [n for n in names if n not in self.voice_names]
            if missing:
                raise ValueError(f"kokoro voices[{lang}]: the voices file has no voice {missing}; "
                                 f"it has {self.voice_names}")
            if lang not in self.language_map:
                raise ValueError(f"kokoro voices[{lang}]: no espeak language for {lang!r}; "
                                 f"add it to speech.kokoro_languages (e.g. {{{lang}: ...}})")

    def voices(self, language: str) -> list[Voice]:
        ml = self.language_map.get(language)
        if ml is None:
            return []
        if self.voice_specs is not None:
            names = self.voice_specs.get(language, [])
        else:
            letters = VOICE_LETTER.get(language, ())
            names = [n for n in self.voice_names if n[:1] in letters]
        return [Voice(self.name, n, 0, language, ml) for n in names]

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        """Speak `text`: the model samples nothing, so the audio is a function of (text,
        voice) alone (onnxruntime's CPU kernels at a fixed thread count)."""
        try:
            with KokoroBackend._lock:
                audio, sr = self.kokoro.create(text, voice.name, speed=self.speed,
                                               lang=voice.model_language)
        except Exception as err:  # a sentence the phonemizer or the model fails on
            raise Rejected("tts_failed", f"kokoro: {type(err).__name__}: {err}") from None
        if sr != self.sample_rate:
            raise Rejected("tts_failed", f"kokoro: the model returned {sr} Hz, not {self.sample_rate}")
        return np.asarray(audio, dtype=np.float32).reshape(-1)
