"""Text-to-speech backends: espeak-ng (zero setup, from the espeakng-loader wheel), coqui, and
Kokoro-82M (transforms.kokoro).

A backend is a small class that loads once (a Ray actor holds one) and turns (text, voice)
into mono float32 samples. Voices are chosen by language: VITA's questions are Chinese and
English, and a Chinese question read by an English voice is garbage, so a language with no
configured voice is not spoken at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from schemas.params import SpeechConfig
from schemas.rejects import Rejected
from transforms.voice import TTSBackend, Voice, parse_voice

log = logging.getLogger("vita_corpus.tts")

# Voices per language: espeak-ng voice names with a variant, and a speaking rate (words/min).
# Variants with `breath` (f2, f3, f5) mix in random noise, which would make the audio differ
# between runs; these are the deterministic ones.
ESPEAK_VOICES: dict[str, list[str]] = {
    "en": ["en-us@175", "en@165", "en-us+f1@170", "en-GB-x-rp+m3@185", "en-029+f4@155"],
    "zh": ["cmn@160", "cmn+f4@150", "cmn+m3@175"],
}

# What a voice can read: text with none of these characters has nothing for it to say.
_SPEAKABLE = {
    "en": re.compile(r"[A-Za-z0-9]"),
    "zh": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff0-9]"),
}


def speakable(text: str, language: str) -> bool:
    pat = _SPEAKABLE.get(language)
    return bool(pat.search(text)) if pat else bool(text.strip())


def one_by_one(backend: Any, items: list[tuple[str, Voice]]) -> Iterator[np.ndarray | Rejected]:
    """`synthesize_many` the plain way: each sentence a `synthesize` call, a sentence's reject
    given back in its place."""
    for text, voice in items:
        try:
            yield backend.synthesize(text, voice)
        except Rejected as err:
            yield err


class EspeakBackend:
    """espeak-ng through its C API (ctypes), library and voice data from espeakng-loader.

    `mode` says where an utterance is spoken. espeak-ng keeps state from one utterance to the
    next (the same sentence comes out a few samples longer or shorter depending on what was
    spoken before), which would make a sample depend on which worker spoke what first:
    - `helper` (the default): a small helper process (transforms/espeak_helper.py), started
      once per backend with the library initialised, forks a child per utterance, so the
      audio is a function of (text, voice) alone and the large worker process never forks;
    - `fork`: this process forks per utterance (the same audio, but a fork of a process that
      holds torch and the transforms costs several milliseconds);
    - `inprocess`: the library in this process, no fork; the audio depends on what was spoken
      before: the synthesis floor for benchmarks, not for builds.
    """

    name = "espeak"
    MODES = ("helper", "fork", "inprocess")
    PIPE_ROOM = 32 << 10  # below Linux's 64 KiB pipe buffer
    _lock = threading.Lock()  # the library holds global state: one synthesis at a time
    _lib: ctypes.CDLL | None = None
    _rate_hz = 0

    def __init__(self, voices: dict[str, list[str]] | None = None, mode: str = "helper") -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise RuntimeError(
                "the espeak backend needs the espeakng-loader package: pip install espeakng-loader"
            ) from None
        if mode not in self.MODES:
            raise ValueError(f"espeak backend: mode must be one of {self.MODES}, got {mode!r}")
        if not hasattr(os, "fork"):  # pragma: no cover - Windows: in-process, order-dependent
            mode = "inprocess"
        self.mode = mode
        self.voice_specs = voices or ESPEAK_VOICES
        self._library = espeakng_loader.get_library_path()
        self._data = espeakng_loader.get_data_path()
        self.model = f"espeak-ng:{getattr(espeakng_loader, '__version__', '')}"
        self._helper: subprocess.Popen[bytes] | None = None
        self._helper_lock = threading.Lock()
        if mode == "helper":
            self.sample_rate = self._start_helper()
            return
        with EspeakBackend._lock:
            if EspeakBackend._lib is None:
                lib = ctypes.CDLL(self._library)
                os.environ["ESPEAK_DATA_PATH"] = self._data
                lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                                  ctypes.c_int]
                lib.espeak_Initialize.restype = ctypes.c_int
                # AUDIO_OUTPUT_SYNCHRONOUS (2): espeak_Synth returns when the audio is complete.
                rate = lib.espeak_Initialize(2, 0, os.path.dirname(self._data).encode(), 0)
                if rate <= 0:
                    raise RuntimeError(f"espeak-ng failed to initialise with data at {self._data}")
                EspeakBackend._rate_hz = rate
                EspeakBackend._lib = lib
        self.lib = EspeakBackend._lib
        self.sample_rate = EspeakBackend._rate_hz
        self._chunks: list[np.ndarray] = []
        cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)

        def _cb(wav: ctypes.POINTER(ctypes.c_short), n: int, _events: ctypes.c_void_p) -> int:
            if n > 0 and wav:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0: go on

        self._cb = cb_type(_cb)  # keep a reference: the library calls it later

    def voices(self, language: str) -> list[Voice]:
        return [parse_voice(self.name, v, language) for v in self.voice_specs.get(language, [])]

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        """Speak `text` as mono float32 at `sample_rate`; Rejected when espeak-ng fails."""
        if self.mode == "helper":
            return self._synthesize_helper(text, voice)
        if self.mode == "fork":
            return self._synthesize_forked(text, voice)
        return self._synthesize_here(text, voice)

    # -- helper mode --------------------------------------------------------------------------

    def _start_helper(self) -> int:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "espeak_helper.py")
        env = {**os.environ, "ESPEAK_DATA_PATH": self._data}
        # -I -S: no site-packages and no user paths, so the helper stays a small image.
        self._helper = subprocess.Popen(
            [sys.executable, "-I", "-S", script, self._library, os.path.dirname(self._data)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        tag = self._read(1)
        if tag == b"R":
            return struct.unpack("<I", self._read(4))[0]
        detail = self._read(struct.unpack("<I", self._read(4))[0]).decode(errors="replace") \
            if tag == b"E" else "the helper exited"
        self.close()
        raise RuntimeError(f"espeak-ng helper: {detail}")

    def _read(self, n: int) -> bytes:
        assert self._helper is not None and self._helper.stdout is not None
        data = self._helper.stdout.read(n)
        if len(data) != n:
            raise BrokenPipeError("the espeak-ng helper closed its output")
        return data

    def _synthesize_helper(self, text: str, voice: Voice) -> np.ndarray:
        request = self._request(text, voice)
        with self._helper_lock:
            for attempt in (0, 1):  # a helper that died (killed, out of memory) is restarted once
                try:
                    if self._helper is None or self._helper.poll() is not None:
                        self.close()
                        self._start_helper()
                    assert self._helper is not None and self._helper.stdin is not None
                    self._helper.stdin.write(request)
                    self._helper.stdin.flush()
                    tag = self._read(1)
                    body = self._read(struct.unpack("<I", self._read(4))[0])
                    break
                except (BrokenPipeError, OSError) as err:
                    self.close()
                    if attempt:
                        raise Rejected("tts_failed", f"espeak-ng helper: {err}") from None
        got = self._audio(tag, body)
        if isinstance(got, Rejected):
            raise got
        return got

    def synthesize_many(self, items: list[tuple[str, Voice]], window: int = 8
                        ) -> Iterator[np.ndarray | Rejected]:
        """`synthesize` for each (text, voice), in order, a Rejected in place of a failure.

        Through the helper, up to `window` requests are in flight: the helper speaks the next
        sentences (each in a fresh fork, as one by one) while the caller works on the last
        one, so the audio is the same as one by one and the two overlap on two cores.
        The requests in flight stay within PIPE_ROOM bytes (one at least), so writing them
        never waits on a helper that waits for its reply to be read."""
        if self.mode != "helper":
            yield from one_by_one(self, items)
            return
        done = sent = 0
        with self._helper_lock:
            try:
                if self._helper is None or self._helper.poll() is not None:
                    self.close()
                    self._start_helper()
                requests = [self._request(t, v) for t, v in items]
                in_flight = 0  # request bytes sent and not yet answered
                while done < len(items):
                    assert self._helper is not None and self._helper.stdin is not None
                    start = sent
                    while sent < len(items) and sent - done < window and (
                            sent == done or in_flight + len(requests[sent]) <= self.PIPE_ROOM):
                        in_flight += len(requests[sent])
                        sent += 1
                    if sent > start:
                        self._helper.stdin.write(b"".join(requests[start:sent]))
                        self._helper.stdin.flush()
                    tag = self._read(1)
                    body = self._read(struct.unpack("<I", self._read(4))[0])
                    in_flight -= len(requests[done])
                    done += 1
                    yield self._audio(tag, body)
            except (BrokenPipeError, OSError):
                self.close()  # the helper died: the rest one by one (which restarts it)
            finally:
                if sent > done:  # left before the replies were read: they would answer the
                    self.close()  # next request, so this helper goes
        for text, voice in items[done:]:
            try:
                yield self.synthesize(text, voice)
            except Rejected as err:
                yield err

    @staticmethod
    def _request(text: str, voice: Voice) -> bytes:
        request = b"\0".join([voice.name.encode(), str(voice.rate).encode(), text.encode()])
        return struct.pack("<I", len(request)) + request

    @staticmethod
    def _audio(tag: bytes, body: bytes) -> np.ndarray | Rejected:
        if tag != b"A":
            return Rejected("tts_failed", f"espeak-ng: {body.decode(errors='replace')}")
        return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0

    def close(self) -> None:
        """Stop the helper process (a later synthesis starts another)."""
        helper, self._helper = self._helper, None
        if helper is not None:
            with contextlib.suppress(OSError):
                helper.stdin.close()  # type: ignore[union-attr]
            try:
                helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
            with contextlib.suppress(OSError):
                helper.stdout.close()  # type: ignore[union-attr]

    def __del__(self) -> None:
        try:  # not contextlib: at interpreter exit the module may be gone already
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at that point
            pass

    # -- fork and in-process modes ------------------------------------------------------------

    def _synthesize_forked(self, text: str, voice: Voice) -> np.ndarray:
        """Each utterance in a forked child of this process's freshly initialised library."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: synthesise, send float32 samples (or an error line), exit
            os.close(r)
            code = 0
            try:
                out = b"A" + self._synthesize_here(text, voice).astype(np.float32).tobytes()
            except Rejected as err:
                out, code = b"E" + err.detail.encode(errors="replace"), 0
            except BaseException as err:  # noqa: BLE001 - reported to the parent as text
                out, code = b"E" + f"{type(err).__name__}: {err}".encode(errors="replace"), 1
            view = memoryview(out)
            while view:
                view = view[os.write(w, view):]
            os._exit(code)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 1 << 20):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(pid, 0)
        data = b"".join(chunks)
        if not data.startswith(b"A"):
            raise Rejected("tts_failed", f"espeak-ng: {data[1:].decode(errors='replace') or 'died'}")
        return np.frombuffer(data[1:], dtype=np.float32).copy()

    def _synthesize_here(self, text: str, voice: Voice) -> np.ndarray:
        lib = self.lib
        data = text.encode("utf-8") + b"\0"
        with EspeakBackend._lock:
            lib.espeak_SetSynthCallback(self._cb)
            if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise Rejected("tts_failed", f"espeak-ng has no voice {voice.name!r}")
            if voice.rate:
                lib.espeak_SetParameter(1, voice.rate, 0)  # espeakRATE
            self._chunks = []
            # position 0, POS_CHARACTER (1), no end, espeakCHARS_UTF8 (1)
            err = lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None)
            if err != 0:
                raise Rejected("tts_failed", f"espeak_Synth returned error {err}")
            lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32) / 32768.0


class CoquiBackend:
    """The `TTS` API of coqui-tts, on a model from a local folder (or the user's model cache).

    Nothing is downloaded: `model_path` + `config_path` load a checkpoint from disk, and a
    model name is only accepted when coqui finds it already in its cache. A voice is a
    (speaker, model language) pair: `voices` lists the speakers per question language (None:
    every speaker of the model), `languages` maps a question language to the model's language
    id (None: matched by name, `zh` finding `zh-cn`; a single-language model speaks `en`). A
    question in a language the model lacks gets no voice and stays text.
    """

    name = "coqui"
    _lock = threading.Lock()  # the seed below is torch's global generator

    def __init__(self, model_path: str | None = None, config_path: str | None = None,
                 model_name: str | None = None, voices: dict[str, list[str]] | None = None,
                 languages: dict[str, str] | None = None, device: str = "cpu",
                 threads: int = 1, batch: int = 1) -> None:
        try:
            from TTS.api import TTS
        except Exception as err:  # ImportError, or a broken optional dependency underneath
            raise RuntimeError(
                "the coqui backend needs the optional extra: pip install 'vita-corpus[coqui]' "
                "with a torchaudio built for your torch (CPU-only machines: make coqui-venv) "
                f"(import failed: {type(err).__name__}: {err})") from None
        if model_path and config_path:
            self.tts = TTS(model_path=model_path, config_path=config_path, progress_bar=False)
            self.model = f"coqui:{os.path.abspath(model_path)}"
        elif model_name:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.tts = TTS(model_name=model_name, progress_bar=False)
            self.model = f"coqui:{model_name}"
        else:
            raise ValueError("coqui backend: give model_path and config_path, or model_name")
        self.tts.to(device)
        # The noise seed's model id: the same with batching on or off.
        self._seed_model = self.model
        self.batch = max(1, int(batch))
        if self.batch > 1 and self._batchable():
            # Batched audio is not bit-identical to one at a time (see synthesize_many), so
            # the cache keeps them apart.
            self.model += f"#batch{self.batch}"
        if device == "cpu" and threads > 0:
            import torch

            # The build runs one backend per core (an actor per CPU); intra-op threads on a
            # sentence's small tensors only wait on each other: 2 threads ran a tiny VITS 50x
            # slower than 1 on a busy 2-core machine.
            torch.set_num_threads(threads)
        synth = self.tts.synthesizer
        self.sample_rate = int(getattr(synth, "output_sample_rate", 0) or 22050)
        self.speakers = [str(s) for s in (self.tts.speakers or [])] if self.tts.is_multi_speaker else []
        self.model_languages = ([str(x) for x in (self.tts.languages or [])]
                                if self.tts.is_multi_lingual else [])
        self.voice_specs = voices
        self.language_map = languages
        for lang, speakers in (voices or {}).items():
            missing = [s for s in speakers if s not in self.speakers]
            if missing and (self.speakers or missing != [""]):
                has = self.speakers or "a single voice: list the speaker as an empty string"
                raise ValueError(f"coqui voices[{lang}]: the model has no speaker {missing}; "
                                 f"it has {has}")
        for lang, ml in (languages or {}).items():
            if self.model_languages and ml not in self.model_languages:
                raise ValueError(f"coqui languages[{lang}]: the model has no language {ml!r}; "
                                 f"it has {self.model_languages}")
            if not self.model_languages and ml:
                raise ValueError(f"coqui languages[{lang}]: the model is single-language; "
                                 "map the question language to \"\"")

    def model_language(self, language: str) -> str | None:
        """The model's id for a question language; None when the model does not speak it."""
        if self.language_map is not None:
            return self.language_map.get(language)
        if not self.model_languages:
            return "" if language == "en" else None
        exact = [m for m in self.model_languages if m == language]
        prefix = [m for m in self.model_languages if m.split("-")[0] == language]
        return (exact or prefix or [None])[0]

    def voices(self, language: str) -> list[Voice]:
        ml = self.model_language(language)
        if ml is None:
            return []
        speakers = self.voice_specs.get(language, []) if self.voice_specs is not None \
            else (self.speakers or [""])
        return [Voice(self.name, s, 0, language, ml) for s in speakers]

    def seed(self, text: str, voice: Voice) -> int:
        return int.from_bytes(hashlib.sha256(
            "\0".join([self._seed_model, voice.id, text]).encode()).digest()[:4], "big")

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        """Speak `text`; VITS-style models sample noise, so torch's generator is seeded from
        (model, voice, text) first and the audio is a function of those alone."""
        import torch

        try:
            with CoquiBackend._lock:
                torch.manual_seed(self.seed(text, voice))
                wav = self.tts.tts(text=text, speaker=voice.name or None,
                                   language=voice.model_language or None, split_sentences=False)
        except Exception as err:  # a model failing on one sentence must not end the run
            raise Rejected("tts_failed", f"coqui: {type(err).__name__}: {err}") from None
        return np.asarray(wav, dtype=np.float32).reshape(-1)

    def _batchable(self) -> bool:
        from TTS.tts.models.vits import Vits

        synth = self.tts.synthesizer
        return isinstance(synth.tts_model, Vits) and synth.vocoder_model is None

    def synthesize_many(self, items: list[tuple[str, Voice]]) -> Iterator[np.ndarray | Rejected]:
        """`synthesize` for each (text, voice) in order, a Rejected in place of a failure;
        with `batch` > 1 and a VITS model, `batch` sentences a model call (padded, each with
        its own length, speaker and language), the items grouped by text length.

        Each sentence's noise is drawn from its own generator, in the layout and order
        `synthesize` draws it, so a batch of one is bit-identical to `synthesize`. In a larger
        batch a sentence differs from itself alone only in its last ~20 ms (the waveform
        decoder's convolutions are not masked, so they see the padding of a shorter sentence)
        and by float rounding (~1e-7) elsewhere. The audio is deterministic for the same
        `items` (a stage's plan fixes them, not the number of workers)."""
        if self.batch <= 1 or not self._batchable():
            yield from one_by_one(self, items)
            return
        # Batches of sentences of about one length pad less: sorted by length (then by their
        # place, so the batches are a function of `items`), spoken, given back in order.
        order = sorted(range(len(items)), key=lambda k: (len(items[k][0]), k))
        done: dict[int, np.ndarray | Rejected] = {}
        for start in range(0, len(order), self.batch):
            ks = order[start:start + self.batch]
            group = [items[k] for k in ks]
            try:
                wavs = self._vits_batch(group)
            except Exception as err:  # noqa: BLE001 - the batch's sentences one at a time
                log.warning("coqui: a batch of %d failed (%s: %s); one at a time", len(group),
                            type(err).__name__, err)
                wavs = [None] * len(group)
            for k, (text, voice), wav in zip(ks, group, wavs, strict=True):
                if wav is None:
                    try:
                        wav = self.synthesize(text, voice)
                    except Rejected as err:
                        wav = err
                done[k] = wav
        for k in range(len(items)):
            yield done[k]

    def _vits_batch(self, group: list[tuple[str, Voice]]) -> list[np.ndarray | None]:
        """Vits.inference (coqui-tts 0.28) on a padded batch, each sentence's noise from its
        own generator; None for a sentence with nothing the tokenizer keeps."""
        import torch
        from TTS.tts.utils.helpers import generate_path, sequence_mask

        model = self.tts.synthesizer.tts_model
        dev = model.device
        rows, ids, spk, dvec, lang = [], [], [], [], []
        for k, (text, voice) in enumerate(group):
            language = voice.model_language or None
            if language is None and model.language_manager is not None \
                    and model.language_manager.num_languages == 1:
                language = model.language_manager.language_names[0]
            tokens = model.tokenizer.text_to_ids(text, language=language) if text else []
            if not tokens:
                continue
            sid, dv = model._get_speaker_id_or_dvector(voice.name or None)
            lid = model._get_language_id(voice.model_language or None) \
                if model.language_manager is not None else None
            rows.append(k)
            ids.append(tokens)
            spk.append(sid)
            dvec.append(dv)
            lang.append(lid)
        out: list[np.ndarray | None] = [None] * len(group)
        if not rows:
            return out
        x_lengths = torch.tensor([len(t) for t in ids], dtype=torch.long)
        x = torch.zeros(len(ids), int(x_lengths.max()), dtype=torch.long)
        for b, t in enumerate(ids):
            x[b, :len(t)] = torch.as_tensor(t, dtype=torch.long)
        aux: dict[str, Any] = {
            "x_lengths": x_lengths.to(dev),
            "speaker_ids": torch.cat(spk).to(dev) if spk[0] is not None else None,
            "d_vectors": torch.cat(dvec).to(dev) if dvec[0] is not None else None,
            "language_ids": torch.tensor(lang, device=dev) if lang[0] is not None else None}
        gens = [torch.Generator().manual_seed(self.seed(*group[k])) for k in rows]

        def noise(lengths: torch.Tensor, channels: int, like: torch.Tensor,
                  time_major: bool = False) -> torch.Tensor:
            """Each row's noise as torch draws it for that sentence alone, zero-padded. Vits's
            z_p noise is randn_like of a transposed tensor, which keeps its strides, and torch
            fills a strided tensor element by element (a contiguous one in vectorised blocks,
            other numbers): so the same layout, filled the same way."""
            z = torch.zeros(like.shape[0], channels, like.shape[-1], dtype=torch.float32)
            for b, gen in enumerate(gens):
                n = int(lengths[b])
                z[b, :, :n] = torch.empty(n, channels).T.normal_(generator=gen) if time_major \
                    else torch.randn(channels, n, generator=gen)
            return z.to(device=like.device, dtype=like.dtype)

        with CoquiBackend._lock, torch.inference_mode():
            g = model._get_speaker_conditioning(aux, "emb_g", normalize_embedding=False)
            lid = aux["language_ids"]
            lang_emb = model.emb_l(lid).unsqueeze(-1) \
                if model.args.use_language_embedding and lid is not None else None
            x, m_p, logs_p, x_mask = model.text_encoder(x.to(dev), aux["x_lengths"],
                                                        lang_emb=lang_emb)
            g_dp = g if model.args.condition_dp_on_speaker else None
            if model.args.use_sdp:
                # The stochastic duration predictor draws torch.randn(B, 2, T_text) inside.
                real = torch.randn
                torch.randn = lambda *size, **kw: noise(x_lengths, size[1], x)  # type: ignore[assignment]
                try:
                    logw = model.duration_predictor(x, x_mask, g=g_dp, reverse=True,
                                                    noise_scale=model.inference_noise_scale_dp,
                                                    lang_emb=lang_emb)
                finally:
                    torch.randn = real
            else:
                logw = model.duration_predictor(x, x_mask, g=g_dp, lang_emb=lang_emb)
            w = torch.exp(logw) * x_mask * model.length_scale
            w_ceil = torch.ceil(w)
            y_lengths = torch.clamp_min(torch.sum(w_ceil, [1, 2]), 1).long()
            y_mask = sequence_mask(y_lengths, None).to(x_mask.dtype).unsqueeze(1)
            attn_mask = x_mask * y_mask.transpose(1, 2)
            attn = generate_path(w_ceil.squeeze(1), attn_mask.squeeze(1).transpose(1, 2))
            m_p = torch.matmul(attn.transpose(1, 2), m_p.transpose(1, 2)).transpose(1, 2)
            logs_p = torch.matmul(attn.transpose(1, 2), logs_p.transpose(1, 2)).transpose(1, 2)
            z_p = m_p + noise(y_lengths.cpu(), m_p.shape[1], m_p, time_major=True) * torch.exp(logs_p) \
                * model.inference_noise_scale
            z = model.flow(z_p, y_mask, g=g, reverse=True)
            z, _, _, y_mask = model.upsampling_z(z, y_lengths=y_lengths, y_mask=y_mask)
            frames = y_mask.sum(dim=(1, 2)).long()
            if model.max_inference_len is not None:
                frames = frames.clamp(max=model.max_inference_len)
            o = model.waveform_decoder((z * y_mask)[:, :, :model.max_inference_len], g=g)
        hop = o.shape[-1] // min(y_mask.shape[-1], model.max_inference_len or y_mask.shape[-1])
        synth = self.tts.synthesizer
        pad = getattr(sys.modules.get("TTS.utils.synthesizer"), "PAD_SILENCE_SAMPLES", 10000)
        for b, k in enumerate(rows):
            wav = o[b, 0, :int(frames[b]) * hop].detach().cpu().numpy().astype(np.float32)
            if synth.tts_config.audio.get("do_trim_silence"):
                wav = wav[:model.ap.find_endpoint(wav)]
            # as Synthesizer.tts ends every sentence
            out[k] = np.concatenate([wav, np.zeros(pad, dtype=np.float32)])
        return out


def make_backend(kind: str, **kwargs: object) -> TTSBackend:
    if kind == "espeak":
        return EspeakBackend(**kwargs)  # type: ignore[arg-type]
    if kind == "coqui":
        return CoquiBackend(**kwargs)  # type: ignore[arg-type]
    if kind == "kokoro":
        from transforms.kokoro import KokoroBackend  # onnxruntime: only when it is asked for

        return KokoroBackend(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown TTS backend {kind!r}; use 'espeak', 'coqui' or 'kokoro'")


def tts_device(setting: str) -> str:
    """The torch device of a neural TTS backend in this process: `auto` takes a GPU where the
    process sees one (Ray sets CUDA_VISIBLE_DEVICES for a task that asked for a GPU share)."""
    if setting != "auto":
        return setting
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_for(sp: SpeechConfig) -> TTSBackend:
    """The backend a speech config names, with its settings."""
    kwargs: dict[str, object] = {}
    if sp.backend == "espeak" and sp.voices:
        kwargs["voices"] = sp.voices
    if sp.backend == "coqui":
        kwargs = {"model_path": sp.coqui_model_path, "config_path": sp.coqui_config_path,
                  "model_name": sp.coqui_model_name, "voices": sp.voices,
                  "languages": sp.coqui_languages, "threads": sp.coqui_threads,
                  "batch": sp.batch,
                  "device": tts_device(sp.device)}
    if sp.backend == "kokoro":
        kwargs = {"model_path": sp.kokoro_model_path, "voices_path": sp.kokoro_voices_path,
                  "voices": sp.voices, "languages": sp.kokoro_languages, "device": sp.device,
                  "threads": sp.kokoro_threads, "speed": sp.kokoro_speed}
    return make_backend(sp.backend, **kwargs)
