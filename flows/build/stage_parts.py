"""A stage partition's work, where the executor runs it: read the chosen samples, speak, write.

The planner (flows.build.stages) decides which ingest samples a stage part holds; this runs on
any worker: it reads only those samples' bytes from the ingest shards, turns about half of the
questions of stage 2.2 into speech (the process's TTS backend, loaded once and kept), and
writes the part (tar, then manifest) straight to OUT. What it writes depends only on the
plan, so the bytes are the same whichever worker runs it, and a retried partition clears its
own part first.
"""

from __future__ import annotations

import itertools
import json
import logging
import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from schemas.config import CorpusConfig
from schemas.params import SpeechConfig
from schemas.recipes import StageRecipe
from schemas.record import Record
from storage.parts import PartWriter, delete_part, part_name, read_manifest, read_samples

SPEECH_KINDS = ("caption", "qa", "ocr", "video", "text")
log = logging.getLogger("vita_corpus.stages")


@dataclass
class StagePartition:
    """One stage part: its samples, as runs of keys per ingest part, in pool order."""

    stage: str  # the recipe's stage id, e.g. "2.2"
    source: str
    pool: str
    part: int  # the part's number in its source
    input_start: int  # the first sample's position among the source's chosen samples
    fingerprint: str  # the stage's fingerprint (recipe, seed, speech settings, ingest shards)
    ingest_stage: str
    runs: list[tuple[str, list[str]]] = field(default_factory=list)  # (ingest part, keys)

    @property
    def count(self) -> int:
        return sum(len(keys) for _, keys in self.runs)

    @property
    def name(self) -> str:
        return part_name(self.source, self.part)


# One synthesizer per process and speech settings: a worker loads its TTS backend once and
# keeps it for every partition it runs.
_SYNTHS: dict[tuple[str, str], Any] = {}


def synthesizer(cfg: CorpusConfig, out: str) -> Any:
    from flows.build.work import Worker, work_context

    ctx = work_context(cfg, out)
    key = (cfg.transforms.speech.model_dump_json(), ctx.tts_cache or "")
    if key not in _SYNTHS:
        _SYNTHS.clear()
        _SYNTHS[key] = Worker(ctx).synth()
    return _SYNTHS[key]


# Samples read ahead when the stage speaks: their questions go to the backend together (the
# espeak-ng helper speaks the next while this process encodes the last; coqui takes a batch).
# A fixed count, so the batches a backend sees depend on the plan alone, never on the workers.
SPEECH_AHEAD = 32


def _ahead(samples: Iterator[tuple[Any, dict[str, bytes]]], synth: Any, sp: SpeechConfig,
           seed: int) -> Iterator[tuple[Any, dict[str, bytes], Record | None]]:
    """(entry, members, parsed record or None) per sample; with a synthesizer, SPEECH_AHEAD
    samples at a time, their questions spoken ahead (`Synthesizer.prefetch`)."""
    from transforms.speech import planned_speech

    if synth is None:
        for entry, members in samples:
            yield entry, members, None
        return
    for chunk in iter(lambda: list(itertools.islice(samples, SPEECH_AHEAD)), []):
        recs = [Record.model_validate_json(members["json"]) for _, members in chunk]
        synth.prefetch([job for rec in recs for job in planned_speech(rec, sp, seed, synth.backend)],
                       sp.sample_rate)
        for (entry, members), rec in zip(chunk, recs, strict=True):
            yield entry, members, rec
        synth.forget()


def write_stage_partition(cfg: CorpusConfig, out: str, recipe: StageRecipe,
                          task: StagePartition) -> dict[str, Any]:
    """Write the stage part `task` plans to OUT; return its counts for the planner."""
    from flows.build.work import count_spoken_audio, sample_info
    from schemas.contract import record_tokens
    from schemas.recipes import max_tokens_for
    from transforms.speech import speak_questions, speech_meta

    t0, c0 = time.monotonic(), time.process_time()
    stage = recipe.dirname
    delete_part(out, stage, task.source, task.part)  # a retry starts clean
    speaking = recipe.speech_fraction > 0 and task.pool in SPEECH_KINDS
    sp = cfg.transforms.speech.model_copy(update={"fraction": recipe.speech_fraction})
    seed = sp.seed if sp.seed is not None else cfg.seed
    synth = synthesizer(cfg, out) if speaking else None
    calls0, hits0 = (synth.calls, synth.hits) if synth else (0, 0)
    budget = max_tokens_for(cfg.sample.max_tokens)
    speech: Counter[str] = Counter()
    writer = PartWriter(out, stage, task.source, task.part, task.input_start, task.fingerprint)
    n, last_log = task.input_start, t0
    try:
        for ingest_part, keys in task.runs:
            m = read_manifest(out, task.ingest_stage, f"{ingest_part}.manifest.json")
            wanted = set(keys)
            # Only the chosen samples' bytes are read, at the offsets the manifest gives.
            for entry, members, rec in _ahead(read_samples(out, m, wanted), synth, sp, seed):
                items = [(s, members[s]) for s in entry.members]
                info = entry.model_dump(include={"language", "task", "tokens", "tiles",
                                                 "frames", "audio_s", "speech",
                                                 "media_sha256", "phash"})
                if synth is not None:
                    res = speak_questions(rec, sp, seed, synth)
                    rec.meta.speech = speech_meta(res)
                    count_spoken_audio(rec)
                    if res.members:
                        rec.meta.members = {**(rec.meta.members or {}),
                                            "audio": [a for a, _ in res.members]}
                    rec.check_placeholders()
                    as_json = rec.to_json()
                    # Spoken questions add audio tokens: a sample the speech would push over
                    # the contract's budget keeps its questions as text.
                    if record_tokens(as_json) <= budget:
                        items = [("json", json.dumps(as_json, ensure_ascii=False).encode()),
                                 *[(s, d) for s, d in items if s != "json"], *res.members]
                        info = sample_info(rec)
                        speech["spoken"] += len(res.spoken)
                        speech["typed"] += res.typed
                        speech.update({f"kept:{k}": v for k, v in res.kept.items()})
                    else:
                        speech["kept:too_many_tokens"] += len(res.spoken)
                writer.add_input(n, entry.key)
                writer.add_sample(entry.key, entry.id, n, items, **info)
                n += 1
                if synth is not None and time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    log.info("%s %s: %d of %d samples, %d questions synthesized, %d from the "
                             "cache", stage, task.name, n - task.input_start, task.count,
                             synth.calls - calls0, synth.hits - hits0)
        if n - task.input_start != task.count:
            raise RuntimeError(f"{stage}/{task.name}: planned {task.count} samples, found "
                               f"{n - task.input_start} in the ingest shards; they changed "
                               "during the build")
        manifest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {"part": task.name, "count": manifest.count, "bytes": manifest.bytes,
            "speech": dict(speech),
            "tts": {"synthesis_calls": synth.calls - calls0 if synth else 0,
                    "cache_hits": synth.hits - hits0 if synth else 0},
            "seconds": time.monotonic() - t0, "cpu_s": time.process_time() - c0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
