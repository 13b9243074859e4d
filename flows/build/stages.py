"""Stage shards: each recipe's share of each pool, copied from the transformed ingest shards.

Every sample is transformed once, at ingest; a stage selects from the ingest manifests (a
seeded coin per sample) and copies the selected samples' members into its own shards, so a
sample drawn into several stages is never decoded or tiled twice. Stage 2.2 also turns about
half of the selected questions into speech (with the synthesis cache). A stage whose recipe,
seed and ingest shards are unchanged is kept as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from schemas.config import CorpusConfig
from schemas.manifest import ShardManifest
from schemas.recipes import StageRecipe
from schemas.record import Record
from storage import uri
from storage.parts import (
    PartWriter,
    delete_part,
    iter_manifests,
    part_name,
    read_manifest,
    read_samples,
    verify_part,
)

SPEECH_KINDS = ("caption", "qa", "ocr", "video", "text")
STAGE_MARKER = "_stage.json"  # written last: the stage is complete and matches its fingerprint


def stage_coin(seed: int, stage: str, pool: str, sample_id: str) -> float:
    h = hashlib.sha256(f"{seed}\0{stage}\0{pool}\0{sample_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def stage_fingerprint(cfg: CorpusConfig, recipe: StageRecipe, ingest: list[ShardManifest]) -> str:
    blob = json.dumps({"recipe": recipe.model_dump(), "seed": cfg.seed,
                       "speech": cfg.transforms.speech.model_dump(mode="json"),
                       "shards": [(m.source, m.part, m.sub, m.sha256) for m in ingest]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_stage(cfg: CorpusConfig, out: str, recipe: StageRecipe, ingest_stage: str = "ingest",
                progress: Callable[[str, int, int, int, bool], None] | None = None
                ) -> dict[str, Any]:
    """Write `out/stage_<id>/`; return the stage's summary (requested vs achieved fractions)."""
    from flows.build.work import Worker, count_spoken_audio, sample_info, work_context
    from schemas.contract import record_tokens
    from schemas.recipes import max_tokens_for
    from transforms.speech import speak_questions, speech_meta

    stage = recipe.dirname
    kinds = {s.name: s.kind for s in cfg.sources}
    # Summaries (no per-sample entries): one small object per ingest part; each part's samples
    # are read when its turn comes, so memory does not grow with the pools.
    ingest = [m for m in iter_manifests(out, ingest_stage, samples=False)
              if kinds.get(m.source) in recipe.pools]
    fp = stage_fingerprint(cfg, recipe, ingest)
    existing = list(iter_manifests(out, stage, samples=False))
    marker = uri.join(out, stage, STAGE_MARKER)
    done = json.loads(uri.read_bytes(marker)) if uri.exists(marker) else {}
    reused = (done.get("fingerprint") == fp
              and sorted(done.get("parts", [])) == sorted(part_name(m.source, m.part, m.sub)
                                                          for m in existing)
              and all(m.config_fingerprint == fp and verify_part(out, m) is None for m in existing))
    pools: dict[str, Counter[str]] = {}
    tts = {"synthesis_calls": 0, "cache_hits": 0}
    for m in ingest:
        pools.setdefault(kinds[m.source], Counter())["available"] += m.count
    if not reused:
        uri.remove(marker)  # the stage is incomplete until the marker is back
        uri.remove_stale_temps(uri.join(out, stage))  # of a killed run; one writer per stage
        for m in existing:
            delete_part(out, stage, m.source, m.part, m.sub)
        sp = cfg.transforms.speech.model_copy(update={"fraction": recipe.speech_fraction})
        synth = Worker(work_context(cfg, out)).synth() if recipe.speech_fraction > 0 else None
        budget = max_tokens_for(cfg.sample.max_tokens)
        by_source: dict[str, list[ShardManifest]] = {}
        for m in ingest:
            by_source.setdefault(m.source, []).append(m)
        for source, manifests in by_source.items():
            pool = kinds[source]
            frac = recipe.pools[pool]
            writer, made, n = PartWriter(out, stage, source, 0, 0, fp), 0, 0
            for summary in manifests:
                m = read_manifest(out, ingest_stage,
                                  f"{part_name(source, summary.part, summary.sub)}.manifest.json")
                chosen = {s.key for s in m.samples
                          if stage_coin(cfg.seed, recipe.stage, pool, s.id) < frac}
                # Only the chosen samples' bytes are read, at the offsets the manifest gives.
                for entry, members in read_samples(out, m, chosen):
                    key = entry.key
                    info = entry.model_dump(include={"language", "task", "tokens", "tiles",
                                                     "frames", "audio_s", "speech",
                                                     "media_sha256", "phash"})
                    items = [(s, members[s]) for s in entry.members]
                    if synth is not None and pool in SPEECH_KINDS:
                        rec = Record.model_validate_json(members["json"])
                        res = speak_questions(rec, sp, sp.seed if sp.seed is not None else cfg.seed,
                                              synth)
                        rec.meta.speech = speech_meta(res)
                        count_spoken_audio(rec)
                        if res.members:
                            rec.meta.members = {**(rec.meta.members or {}),
                                                "audio": [a for a, _ in res.members]}
                        rec.check_placeholders()
                        as_json = rec.to_json()
                        # Spoken questions add audio tokens: a sample the speech would push
                        # over the contract's budget keeps its questions as text.
                        if record_tokens(as_json) <= budget:
                            items = [("json", json.dumps(as_json, ensure_ascii=False).encode()),
                                     *[(s, d) for s, d in items if s != "json"], *res.members]
                            info = sample_info(rec)
                    writer.add_input(n, key)
                    writer.add_sample(key, entry.id, n, items, **info)
                    n += 1
                    pools[pool]["selected"] += 1
                    if progress:
                        total = sum(c["selected"] for c in pools.values())
                        progress(stage, total, total, 0, False)
                    if len(writer.samples) >= recipe.shard_max_samples:
                        writer.commit()
                        made += 1
                        writer = PartWriter(out, stage, source, made, n, fp)
            if writer.samples:
                writer.commit()
            else:
                writer.abort()
        if progress:
            total = sum(c["selected"] for c in pools.values())
            progress(stage, total, total, 0, True)
        if synth is not None:
            tts = {"synthesis_calls": synth.calls, "cache_hits": synth.hits}
        parts = [part_name(m.source, m.part, m.sub)
                 for m in iter_manifests(out, stage, samples=False)]
        uri.write_bytes_atomic(marker, json.dumps({"fingerprint": fp, "parts": parts}).encode())
    else:
        for m in existing:
            pools.setdefault(kinds.get(m.source, "?"), Counter())["selected"] += m.count
    return {
        "stage": recipe.stage, "name": recipe.name, "reused": reused, "tts": tts,
        "speech_fraction": recipe.speech_fraction, "trainable": recipe.trainable,
        "pools": {p: {"requested": recipe.pools[p], "available": c["available"],
                      "selected": c["selected"],
                      "achieved": round(c["selected"] / c["available"], 4) if c["available"] else None}
                  for p, c in sorted(pools.items())},
    }
