"""Stage shards: each recipe's share of each pool, copied from the transformed ingest shards.

Every sample is transformed once, at ingest; a stage selects from the ingest manifests (a
seeded coin per sample) and copies the selected samples' members into its own shards, so a
sample drawn into several stages is never decoded or tiled twice. Stage 2.2 also turns about
half of the selected questions into speech (with the synthesis cache).

The work is spread like the ingest's: `StagePlanner` (in the driver or the flow's process)
reads the ingest manifests, draws the coins and cuts each source's chosen samples into parts
of `shard_max_samples`; each part is a partition that any worker writes
(flows.build.stage_parts: it reads the chosen samples, speaks, and writes the part straight to
OUT). Which samples a part holds depends only on the ingest manifests, the recipe and the seed,
so the bytes are the same whatever the executor and the number of workers. A stage whose
recipe, seed and ingest shards are unchanged is kept as it is; after a kill, the parts already
committed with the stage's fingerprint are kept and only the rest are written.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from flows.build.executors import Executor
from flows.build.stage_parts import SPEECH_KINDS, StagePartition, write_stage_partition
from schemas.config import CorpusConfig
from schemas.manifest import AccountingError, ShardManifest
from schemas.recipes import StageRecipe
from storage import uri
from storage.parts import delete_part, iter_manifests, part_name, read_manifest, verify_part

__all__ = ["SPEECH_KINDS", "STAGE_MARKER", "StagePartition", "StagePlanner", "build_stage",
           "stage_coin", "stage_fingerprint", "write_stage_partition"]
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


# (stage, samples written, samples planned so far, speech counters, final)
StageProgress = Callable[[str, int, int, dict[str, int], bool], None]


class StagePlanner:
    """Plans a stage as partitions (one per stage part), keeps what a killed run committed,
    adds up what the partitions report and commits the stage (its marker, written last)."""

    def __init__(self, cfg: CorpusConfig, out: str, recipe: StageRecipe,
                 ingest_stage: str = "ingest") -> None:
        self.cfg, self.out, self.recipe, self.ingest_stage = cfg, out, recipe, ingest_stage
        self.stage = recipe.dirname
        self.kinds = {s.name: s.kind for s in cfg.sources}
        # Summaries (no per-sample entries): one small object per ingest part; each part's
        # samples are read when the planner reaches it, so memory does not grow with the pools.
        self.ingest = [m for m in iter_manifests(out, ingest_stage, samples=False)
                       if self.kinds.get(m.source) in recipe.pools]
        self.fp = stage_fingerprint(cfg, recipe, self.ingest)
        self.marker = uri.join(out, self.stage, STAGE_MARKER)
        self.pools: dict[str, Counter[str]] = {}
        for m in self.ingest:
            self.pools.setdefault(self.kinds[m.source], Counter())["available"] += m.count
        self.tts = {"synthesis_calls": 0, "cache_hits": 0}
        self.speech: Counter[str] = Counter()
        self.work: Counter[str] = Counter()  # partitions, kept, failed, written_by_flow
        self.cpu_s, self.peak_rss_mb = 0.0, 0.0
        self.written = self.planned = 0
        self._expected: dict[str, int] = {}  # part -> planned samples, until its result comes
        existing = list(iter_manifests(out, self.stage, samples=False))
        done = json.loads(uri.read_bytes(self.marker)) if uri.exists(self.marker) else {}
        good = {part_name(m.source, m.part, m.sub): m for m in existing
                if m.config_fingerprint == self.fp and m.sub is None
                and verify_part(out, m) is None}
        self.reused = (done.get("fingerprint") == self.fp
                       and sorted(done.get("parts", [])) == sorted(good)
                       and len(good) == len(existing))
        self.keep: dict[str, int] = {}  # committed parts of this fingerprint, kept on a rerun
        if self.reused:
            for m in existing:
                self.pools.setdefault(self.kinds.get(m.source, "?"), Counter())["selected"] += m.count
            return
        uri.remove(self.marker)  # the stage is incomplete until the marker is back
        uri.remove_stale_temps(uri.join(out, self.stage))  # of a killed run; one planner a stage
        for m in existing:
            name = part_name(m.source, m.part, m.sub)
            if name in good:
                self.keep[name] = good[name].count
            else:
                delete_part(out, self.stage, m.source, m.part, m.sub)

    def partitions(self) -> Iterator[StagePartition]:
        """The parts still to write, source by source in pool order; those a killed run
        committed are kept (and counted) instead."""
        if self.reused:
            return
        by_source: dict[str, list[ShardManifest]] = {}
        for m in self.ingest:
            by_source.setdefault(m.source, []).append(m)
        size = self.recipe.shard_max_samples
        for source, manifests in by_source.items():
            pool = self.kinds[source]
            frac = self.recipe.pools[pool]
            cur = self._new(source, pool, 0, 0)
            for summary in manifests:
                name = part_name(source, summary.part, summary.sub)
                m = read_manifest(self.out, self.ingest_stage, f"{name}.manifest.json")
                keys: list[str] = []
                for s in m.samples:
                    if stage_coin(self.cfg.seed, self.recipe.stage, pool, s.id) >= frac:
                        continue
                    keys.append(s.key)
                    if cur.count + len(keys) >= size:
                        cur.runs.append((name, keys))
                        keys = []
                        yield from self._emit(cur)
                        cur = self._new(source, pool, cur.part + 1, cur.input_start + cur.count)
                if keys:
                    cur.runs.append((name, keys))
            if cur.count:
                yield from self._emit(cur)

    def _new(self, source: str, pool: str, part: int, start: int) -> StagePartition:
        return StagePartition(self.recipe.stage, source, pool, part, start, self.fp,
                              self.ingest_stage)

    def _emit(self, p: StagePartition) -> Iterator[StagePartition]:
        self.pools[p.pool]["selected"] += p.count
        self.planned += p.count
        if self.keep.get(p.name) == p.count:
            self.work["kept"] += 1
            self.written += p.count
            del self.keep[p.name]
            return
        self._expected[p.name] = p.count
        self.work["partitions"] += 1
        yield p

    def add(self, p: StagePartition, result: dict[str, Any]) -> None:
        """Account for a partition's result: its part holds exactly the samples planned."""
        expected = self._expected.pop(p.name, None)
        if expected is None or result["count"] != expected:
            raise AccountingError(f"{self.stage}/{p.name}: planned {expected} samples, the "
                                  f"partition wrote {result['count']}; this is a bug, please "
                                  "report it")
        self.written += result["count"]
        for k in self.tts:
            self.tts[k] += result["tts"][k]
        self.speech.update(result["speech"])
        self.cpu_s += result.get("cpu_s", 0.0)
        self.peak_rss_mb = max(self.peak_rss_mb, result.get("peak_rss_mb", 0.0))

    def finish(self) -> dict[str, Any]:
        """Check the accounting, write the stage's marker, return its summary."""
        if not self.reused:
            if self._expected or self.written != self.planned:
                raise AccountingError(f"{self.stage}: planned {self.planned} samples, "
                                      f"{self.written} written; parts missing: "
                                      f"{sorted(self._expected)}")
            for name in self.keep:  # committed by a killed run but no longer planned
                m = read_manifest(self.out, self.stage, f"{name}.manifest.json", samples=False)
                delete_part(self.out, self.stage, m.source, m.part, m.sub)
            parts = [part_name(m.source, m.part, m.sub)
                     for m in iter_manifests(self.out, self.stage, samples=False)]
            uri.write_bytes_atomic(self.marker, json.dumps({"fingerprint": self.fp,
                                                            "parts": parts}).encode())
        r = self.recipe
        return {
            "stage": r.stage, "name": r.name, "reused": self.reused, "tts": dict(self.tts),
            "speech_fraction": r.speech_fraction, "trainable": r.trainable,
            "pools": {p: {"requested": r.pools[p], "available": c["available"],
                          "selected": c["selected"],
                          "achieved": round(c["selected"] / c["available"], 4)
                          if c["available"] else None}
                      for p, c in sorted(self.pools.items())},
            "speech": dict(sorted(self.speech.items())),
            "partitions": {"written": self.work["partitions"], "kept": self.work["kept"],
                           "failed": self.work["failed"],
                           "written_by_flow": self.work["written_by_flow"],
                           "cpu_s": round(self.cpu_s, 3),
                           "peak_rss_mb": round(self.peak_rss_mb, 1)},
        }


def build_stage(cfg: CorpusConfig, out: str, recipe: StageRecipe, ingest_stage: str = "ingest",
                progress: StageProgress | None = None, executor: Executor | None = None
                ) -> dict[str, Any]:
    """Write `out/stage_<id>/`, its parts on the executor's workers (default: this process);
    return the stage's summary (requested vs achieved fractions, speech, partitions)."""
    from flows.build.executors import LocalExecutor

    executor = executor or LocalExecutor()
    planner = StagePlanner(cfg, out, recipe, ingest_stage)
    fn = functools.partial(write_stage_partition, cfg, out, recipe)
    options = gpu_options(cfg, recipe, getattr(executor, "gpus", 0.0))
    for p, result in executor.map_tasks(fn, ((p, p) for p in planner.partitions()),
                                        name=f"stage {recipe.stage} part", **options):
        planner.add(p, result)
        if progress:
            progress(planner.stage, planner.written, planner.planned, speech_progress(planner),
                     False)
    summary = planner.finish()
    if progress:
        progress(planner.stage, planner.written, planner.planned, speech_progress(planner), True)
    return summary


def speech_progress(planner: StagePlanner) -> dict[str, int]:
    """What a long stage's progress shows: questions synthesized, from the cache, kept as text."""
    kept = sum(v for k, v in planner.speech.items() if k.startswith("kept:"))
    return {"synthesized": planner.tts["synthesis_calls"], "cached": planner.tts["cache_hits"],
            "kept_as_text": kept + planner.speech.get("typed", 0)}


def gpu_options(cfg: CorpusConfig, recipe: StageRecipe, gpus: float) -> dict[str, Any]:
    """The share of a GPU each stage task asks Ray for (on a cluster of `gpus` GPUs): only
    where the stage speaks with a neural backend on a GPU (speech.device cuda, or auto and the
    cluster has GPUs)."""
    sp = cfg.transforms.speech
    if recipe.speech_fraction <= 0 or sp.backend != "coqui" or sp.device == "cpu":
        return {}
    if sp.device == "auto" and not gpus:
        return {}
    return {"num_gpus": sp.gpu_share}
