"""The per-input work an executor runs: fetch media, transform, speak, serialise the sample.

It runs wherever the executor puts it (in-process, or a Ray Data actor), so it takes and
returns plain dicts. A `Worker` is built once per process or actor, so the TTS backend loads
once and serves every record that process sees.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from flows.build.executors import failed_result
from schemas.config import CorpusConfig
from schemas.contract import check_record
from schemas.params import LimitsConfig, TransformSettings
from schemas.record import Record
from schemas.rejects import Rejected
from storage.embedded import EmbeddedMedia
from storage.media import fetcher
from transforms.record import prepare_members


@dataclass(frozen=True)
class WorkContext:
    settings: TransformSettings
    max_image_pixels: int
    media_roots: tuple[tuple[str, str], ...]  # (source name, media root URI)
    kinds: tuple[tuple[str, str], ...]  # (source name, source kind)
    seed: int  # the speech coin's seed
    tts_cache: str | None  # synthesis cache folder
    max_tokens: int = 0  # the sample budget (schemas.contract); 0: not checked
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # file sizes, decode budgets
    # (source name, its data root) for sources whose media lie inside their files (parquet,
    # webdataset): references there are read from the file again (storage.embedded)
    data_roots: tuple[tuple[str, str], ...] = ()
    media_cache: str | None = None  # the content-addressed cache of transformed media; None: off
    phash: bool = False  # each image's perceptual hash in its meta (near-duplicate images)

    def root(self, source: str) -> str:
        return dict(self.media_roots)[source]

    def kind(self, source: str) -> str:
        return dict(self.kinds)[source]


def work_context(cfg: CorpusConfig, out: str) -> WorkContext:
    """The work's settings for a build of `cfg` into `out` (the TTS cache defaults to OUT)."""
    from schemas.recipes import max_tokens_for
    from storage import uri
    from storage.readers import data_root, default_media_root

    return WorkContext(settings=cfg.transforms, max_image_pixels=cfg.media.max_image_pixels,
                       media_roots=tuple((s.name, default_media_root(s)) for s in cfg.sources),
                       kinds=tuple((s.name, s.kind) for s in cfg.sources), seed=cfg.seed,
                       tts_cache=cfg.transforms.speech.cache or uri.join(out, "cache", "tts"),
                       max_tokens=max_tokens_for(cfg.sample.max_tokens), limits=cfg.limits,
                       data_roots=tuple((s.name, data_root(s)) for s in cfg.sources
                                        if s.format in ("parquet", "webdataset")),
                       media_cache=(cfg.dedupe.cache or uri.join(out, "cache", "media"))
                       if cfg.dedupe.media_cache else None,
                       phash=cfg.dedupe.near_image.enabled)


def spoken_audio_s(rec: Record) -> list[float]:
    """Durations of the audio that speech synthesis added: spoken questions, a TTS target."""
    speech, target = getattr(rec.meta, "speech", None), getattr(rec.meta, "speech_target", None)
    out = [q["duration_s"] for q in (speech or {}).get("questions", [])]
    if target:
        out.append(target["duration_s"])
    return out


def count_spoken_audio(rec: Record) -> None:
    """Add the synthesised audio to `meta.tokens` (audio and total), at the audio adapter's
    rate; call once, after the speech metadata is set."""
    from transforms.audio import AUDIO_TOKENS_PER_S

    extra = sum(math.ceil(d * AUDIO_TOKENS_PER_S) for d in spoken_audio_s(rec))
    if not extra:
        return
    tokens = dict(getattr(rec.meta, "tokens", None) or {})
    if "total" not in tokens:
        tokens["total"] = sum(tokens.values())
    tokens["audio"] = tokens.get("audio", 0) + extra
    tokens["total"] += extra
    rec.meta.tokens = tokens


def sample_info(rec: Record) -> dict[str, Any]:
    """What the manifest keeps of a sample, so reports never need to open the shards."""
    m = rec.meta.model_dump()
    sp = m.get("speech")
    audio_s = [a["duration_s"] for a in m.get("audio_info") or []] + spoken_audio_s(rec)
    tokens = m.get("tokens") or {}
    total = tokens.get("total", sum(v for k, v in tokens.items() if k != "total"))
    return {
        "language": rec.meta.language, "task": rec.meta.task, "tokens": int(total),
        "tiles": [img["tiles"] for img in (m.get("tiling") or {}).get("images", [])],
        "frames": (m.get("video") or {}).get("frames", 0), "audio_s": audio_s,
        "speech": None if not sp else {"spoken": sp["spoken"], "typed": sp["typed"],
                                        "kept_as_text": sp["kept_as_text"]},
        "media_sha256": [h for kind in ("image", "video", "audio")
                         for h in (m.get("media_sha256") or {}).get(kind, [])],
        "phash": [img["phash"] for img in (m.get("tiling") or {}).get("images", [])
                  if img.get("phash")],
    }


def internal_error(err: BaseException, source: str | None, index: int | None
                   ) -> dict[str, Any]:
    """The result of an input whose work raised something unexpected: an `internal_error`
    reject naming the exception, the source and the input's position."""
    import traceback

    where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    at = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno}" if where else ""
    msg = str(err).splitlines()[0][:300] if str(err) else ""
    return failed_result("internal_error", f"{type(err).__name__}: {msg}{at} (source "
                                           f"{source!r}, input {index})")


class Worker:
    """Callable on a payload; holds the TTS backend (loaded on first use)."""

    def __init__(self, ctx: WorkContext) -> None:
        self.ctx = ctx
        self._synth = None
        self._embedded: dict[str, EmbeddedMedia] = {}
        self.cache = None
        if ctx.media_cache:
            from storage.media_cache import MediaCache

            self.cache = MediaCache(ctx.media_cache)

    def embedded(self, source: str) -> EmbeddedMedia | None:
        """The reader of `source`'s embedded media, kept so that it reads forward."""
        roots = dict(self.ctx.data_roots)
        if source not in roots:
            return None
        if source not in self._embedded:
            self._embedded[source] = EmbeddedMedia(roots[source], self.ctx.limits)
        return self._embedded[source]

    def synth(self):
        if self._synth is None:
            from transforms.speech import Synthesizer
            from transforms.tts import backend_for

            sp = self.ctx.settings.speech
            gate = None
            if sp.gate.enabled:
                from transforms.speech_gate import SpeechGate

                gate = SpeechGate(sp.gate)
            self._synth = Synthesizer(backend_for(sp), self.ctx.tts_cache, gate)
        return self._synth

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        """{"source", "index", "record": JSON} -> {"ok", "suffixes", "payloads"} or
        {"ok": False, "reason"}.

        Expected drops come back as data with their reason. Anything unexpected (a bug, or a
        decoder failing in a way nobody foresaw) comes back as this input's `internal_error`,
        with the exception, so that one input cannot end a build; the build counts them and
        exits 1. Only what is not an Exception (KeyboardInterrupt, SystemExit) propagates.
        """
        if payload.get("error"):  # decided by the driver (a parse error, a duplicate id)
            return failed_result(*payload["error"])
        try:
            return self._work(payload)
        except Exception as err:  # noqa: BLE001 - the input's reject says what it was
            return internal_error(err, payload.get("source"), payload.get("index"))

    def _work(self, payload: dict[str, Any]) -> dict[str, Any]:
        rec = Record.model_validate_json(payload["record"])
        ctx, sp = self.ctx, self.ctx.settings.speech
        calls = hits = 0
        c_hits, c_misses = (self.cache.hits, self.cache.misses) if self.cache else (0, 0)
        emb = self.embedded(payload["source"])
        reads = emb.stats.counts() if emb else {}  # what reading its embedded media cost
        try:
            if rec.meta.task == "tts_pair":
                from transforms.speech import tts_pair

                synth = self.synth()
                c0, h0 = synth.calls, synth.hits
                flac, meta = tts_pair(rec, rec.conversations[0].value, sp,
                                      sp.seed if sp.seed is not None else ctx.seed, synth)
                calls, hits = synth.calls - c0, synth.hits - h0
                members = [("audio_00.flac", flac)]
                meta = {"speech_target": meta, "members": {"audio": ["audio_00.flac"]}}
            else:
                members, meta = prepare_members(
                    rec, fetcher(ctx.root(payload["source"]), ctx.limits.max_file_mb,
                                 emb),
                    ctx.settings, ctx.max_image_pixels, ctx.limits, cache=self.cache,
                    media_sha256=payload.get("media_sha256"), phash=ctx.phash)
                if sp.enabled and ctx.kind(payload["source"]) in sp.kinds:
                    from transforms.speech import speak_questions, speech_meta

                    synth = self.synth()
                    c0, h0 = synth.calls, synth.hits
                    res = speak_questions(rec, sp, sp.seed if sp.seed is not None else ctx.seed,
                                          synth)
                    calls, hits = synth.calls - c0, synth.hits - h0
                    members += res.members
                    meta["speech"] = speech_meta(res)
                    if res.members:
                        meta["members"]["audio"] = [m for m, _ in res.members]
            for k, v in meta.items():
                setattr(rec.meta, k, v)
            count_spoken_audio(rec)
            as_json = rec.to_json()
            # The contract the gate checks: whatever it would refuse per sample is rejected here.
            check_record(as_json, ctx.max_tokens or None)
            try:
                js = json.dumps(as_json, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as err:
                raise Rejected("invalid_utf8", f"a string holds an unpaired surrogate: {err}") from None
        except Rejected as err:
            return {**failed_result(err.reason, err.detail), "tts_calls": calls, "tts_hits": hits,
                    **self._cache_counts(c_hits, c_misses),
                    "embedded_reads": emb.stats.since(reads) if emb else {}}
        return {"ok": True, "reason": "", "detail": "",
                "suffixes": ["json", *(s for s, _ in members)],
                "payloads": [js, *(d for _, d in members)],
                "tts_calls": calls, "tts_hits": hits, "info": sample_info(rec),
                **self._cache_counts(c_hits, c_misses),
                "embedded_reads": emb.stats.since(reads) if emb else {}}

    def _cache_counts(self, hits: int, misses: int) -> dict[str, int]:
        if self.cache is None:
            return {"cache_hits": 0, "cache_misses": 0}
        return {"cache_hits": self.cache.hits - hits, "cache_misses": self.cache.misses - misses}
