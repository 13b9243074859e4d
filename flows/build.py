"""The ingest build: every source, read -> check -> shard, resumable, with its accounting.

Each source is written as numbered parts (see storage.parts). A rerun keeps the parts whose
manifest, checksum, config fingerprint and input hash still hold, and continues after them, so
a crash costs at most one part and an appended source costs only its new parts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flows.executors import Executor, LocalExecutor
from flows.report import write_report
from flows.stages import build_stage
from schemas.config import CorpusConfig, SourceConfig, dump_config
from schemas.manifest import AccountingError, ShardManifest
from schemas.recipes import StageRecipe
from schemas.rejects import Rejected, RejectRecord
from schemas.version import code_version
from storage import uri
from storage.parts import (
    REJECTS_DIR,
    PartWriter,
    delete_part,
    list_manifests,
    orphan_parts,
    remove_part_temps,
    verify_part,
)
from storage.readers import Item, read_source
from storage.shards import sample_key

DEFAULT_STAGE = "ingest"
# (source, inputs, written, rejected, final): called per input and once when a source is done
Progress = Callable[[str, int, int, int, bool], None]
# (source, manifest): called after each part is committed
OnCommit = Callable[[str, ShardManifest], None]


class BuildError(RuntimeError):
    """The build cannot go on; the message says what to do."""


@dataclass
class SourceStats:
    name: str
    kind: str
    inputs: int = 0
    written: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    parts: int = 0
    parts_reused: int = 0
    shard_bytes: int = 0
    members: Counter[str] = field(default_factory=Counter)
    languages: Counter[str] = field(default_factory=Counter)
    speech: Counter[str] = field(default_factory=Counter)  # spoken, typed, kept:<reason>

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "inputs": self.inputs, "written": self.written,
            "rejected": self.rejected, "reject_reasons": dict(sorted(self.reasons.items())),
            "parts": self.parts, "parts_reused": self.parts_reused,
            "shard_bytes": self.shard_bytes, "members": dict(sorted(self.members.items())),
            "languages": dict(sorted(self.languages.items())),
            "speech_questions": dict(sorted(self.speech.items())),
            "accounted": self.inputs == self.written + self.rejected,
        }


def source_fingerprint(cfg: CorpusConfig, src: SourceConfig) -> str:
    """What changes a source's output: its own config, shard, media and transform settings."""
    blob = json.dumps({"source": src.model_dump(mode="json"),
                       "shard": cfg.shard.model_dump(), "media": cfg.media.model_dump(),
                       "transforms": cfg.transforms.model_dump(mode="json")},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _input_digests(src: SourceConfig, kept: list[ShardManifest]) -> int | None:
    """Check the inputs behind kept parts are unchanged; return the first part that differs."""
    if not kept:
        return None
    end = kept[-1].input_end
    j, h = 0, hashlib.sha256()
    for item in read_source(src, start=end):
        if item.index >= end:
            break
        data = item.raw.encode("utf-8", "surrogateescape")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        if item.index + 1 == kept[j].input_end:
            if h.hexdigest() != kept[j].input_sha256:
                return j
            j, h = j + 1, hashlib.sha256()
    return j if j < len(kept) else None


def leading_parts(manifests: list[ShardManifest], fp: str,
                  verify: Callable[[ShardManifest], bool] | None = None) -> list[ShardManifest]:
    """The committed parts of config `fp` that follow each other from part 0 and input 0 (and
    pass `verify`): what a rerun can keep, in part order."""
    kept: list[ShardManifest] = []
    for m in manifests:
        expected_start = kept[-1].input_end if kept else 0
        if (m.config_fingerprint != fp or m.part != len(kept) or m.input_start != expected_start
                or (verify is not None and not verify(m))):
            break
        kept.append(m)
    return kept


def _resume_point(out: str, stage: str, src: SourceConfig, fp: str,
                  overwrite: bool) -> list[ShardManifest]:
    existing = list_manifests(out, stage, src.name)
    # A task retried after its worker was killed resumes here, without prepare()'s cleanup.
    remove_part_temps(out, stage, src.name)
    for part in orphan_parts(out, stage, src.name, {m.part for m in existing}):
        delete_part(out, stage, src.name, part)
    kept = leading_parts(existing, fp, verify=lambda m: verify_part(out, m) is None)
    if len(existing) > len(kept):  # the first part not kept: of another config?
        m = existing[len(kept)]
        if m.config_fingerprint != fp and not overwrite:
            raise BuildError(
                f"{out}/{stage} holds shards of source {src.name!r} built with a different "
                f"config (fingerprint {m.config_fingerprint}, now {fp}). Pass --overwrite to "
                f"rebuild them, or build into another --out."
            )
    changed = _input_digests(src, kept)
    if changed is not None:
        kept = kept[:changed]
    for m in existing[len(kept):]:
        delete_part(out, stage, src.name, m.part)
    return kept


class _SourceRun:
    """The driver's state for one source: resume point, open part, counters."""

    def __init__(self, cfg: CorpusConfig, src: SourceConfig, out: str, stage: str,
                 overwrite: bool, progress: Progress | None, on_commit: OnCommit | None = None
                 ) -> None:
        self.cfg, self.src, self.out, self.stage, self.progress = cfg, src, out, stage, progress
        self.on_commit = on_commit
        self.fp = source_fingerprint(cfg, src)
        self.kept = _resume_point(out, stage, src, self.fp, overwrite)
        self.resume = self.kept[-1].input_end if self.kept else 0
        self.seen = {s.key for m in self.kept for s in m.samples}
        self.made: list[ShardManifest] = []
        self.writer = self._new_part(self.resume)
        self.n_in = self.resume
        self.n_ok = sum(m.count for m in self.kept)
        self.n_rej = sum(m.rejected for m in self.kept)
        self.stats: SourceStats | None = None
        self.tts_calls = self.tts_hits = 0  # this run's synthesis calls and cache hits

    def _new_part(self, start: int) -> PartWriter:
        return PartWriter(self.out, self.stage, self.src.name, len(self.kept) + len(self.made),
                          start, self.fp)

    def _commit(self) -> None:
        self.made.append(self.writer.commit())
        if self.on_commit:
            self.on_commit(self.src.name, self.made[-1])

    def payloads(self) -> Iterator[tuple[_SourceRun, Item | None, dict[str, Any] | None]]:
        """(run, item, payload) per new input, then (run, None, None) to close the source."""
        for item in read_source(self.src, start=self.resume):
            if item.index < self.resume:
                continue
            payload: dict[str, Any] = {"source": self.src.name, "index": item.index}
            if item.error is not None:
                payload["error"] = (item.error.reason, item.error.detail)
            else:
                assert item.record is not None
                key = sample_key(self.src.name, item.record.id)
                if key in self.seen:
                    payload["error"] = ("duplicate_id", f"id {item.record.id!r} (key {key}) "
                                                        "appeared earlier in this source")
                else:
                    self.seen.add(key)
                    payload["record"] = item.record.model_dump_json(by_alias=True)
            yield self, item, payload
        yield self, None, None

    def add(self, item: Item, result: dict[str, Any]) -> None:
        limits = self.cfg.shard
        if result["ok"]:
            rec = item.record
            assert rec is not None
            members = list(zip(result["suffixes"], result["payloads"], strict=True))
            size = sum(512 + len(d) + (-len(d) % 512) for _, d in members)
            if self.writer.samples and self.writer.bytes + size > limits.max_bytes:
                self._commit()
                self.writer = self._new_part(item.index)
            self.writer.add_input(item.index, item.raw)
            self.writer.add_sample(sample_key(self.src.name, rec.id), rec.id, item.index, members,
                                   **result["info"])
            self.n_ok += 1
        else:
            self.writer.add_input(item.index, item.raw)
            self.writer.add_reject(RejectRecord.from_rejection(
                Rejected(result["reason"], result["detail"]), source=self.src.name,
                index=item.index, lineage=item.lineage, record_id=item.record_id, raw=item.raw))
            self.n_rej += 1
        self.n_in += 1
        self.tts_calls += result.get("tts_calls", 0)
        self.tts_hits += result.get("tts_hits", 0)
        if self.progress:
            self.progress(self.src.name, self.n_in, self.n_ok, self.n_rej, False)
        w = self.writer
        if len(w.samples) >= limits.max_samples or w.inputs >= 4 * limits.max_samples:
            self._commit()
            self.writer = self._new_part(item.index + 1)

    def finish(self) -> SourceStats:
        if self.writer.inputs:
            self._commit()
        else:
            self.writer.abort()
        if self.progress:
            self.progress(self.src.name, self.n_in, self.n_ok, self.n_rej, True)
        self.stats = _stats(self.src, self.kept, self.made, self.n_in)
        return self.stats

    def abort(self) -> None:
        self.writer.abort()


def _stats(src: SourceConfig, kept: list[ShardManifest], made: list[ShardManifest],
           inputs_read: int) -> SourceStats:
    st = SourceStats(src.name, src.kind, parts_reused=len(kept))
    expected = 0
    for m in kept + made:
        if m.input_start != expected:
            raise AccountingError(f"source {src.name!r}: part {m.part} starts at input "
                                  f"{m.input_start}, expected {expected}: inputs were skipped")
        expected = m.input_end
        st.inputs += m.inputs
        st.written += m.count
        st.rejected += m.rejected
        st.reasons.update(m.reject_reasons)
        st.members.update(m.member_counts)
        st.shard_bytes += m.bytes
        st.languages.update(s.language for s in m.samples)
        for s in m.samples:
            if s.speech:
                st.speech["spoken"] += s.speech["spoken"]
                st.speech["typed"] += s.speech["typed"]
                st.speech.update({f"kept:{k}": v for k, v in s.speech["kept_as_text"].items()})
        st.parts += 1
    if st.inputs != inputs_read or st.inputs != st.written + st.rejected:
        raise AccountingError(
            f"source {src.name!r}: read {inputs_read} inputs, parts account for {st.inputs}, "
            f"written {st.written} + rejected {st.rejected}. Nothing may be lost; this is a bug."
        )
    return st


def _make_worker(cfg: CorpusConfig, out: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The per-input work. It imports torch and the transforms (seconds): only when an
    executor needs it, so a driver or shard task that is handed results does not pay for it."""
    from flows.work import Worker, work_context

    return Worker(work_context(cfg, out))


def ingest(cfg: CorpusConfig, out: str, stage: str = DEFAULT_STAGE, overwrite: bool = False,
           progress: Progress | None = None, executor: Executor | None = None,
           sources: list[str] | None = None, on_commit: OnCommit | None = None
           ) -> tuple[list[SourceStats], dict[str, int]]:
    """Ingest `sources` (default: all) of `cfg` into `out/<stage>/`; (stats, tts counters).

    The executor runs the per-input work (media checks and transforms); the default is the
    in-process one. Reading, ordering, sharding and accounting stay in this process.
    """
    executor = executor or LocalExecutor()
    uri.makedirs(uri.join(out, stage))
    uri.makedirs(uri.join(out, REJECTS_DIR))
    chosen = [s for s in cfg.sources if sources is None or s.name in sources]
    runs = [_SourceRun(cfg, src, out, stage, overwrite, progress, on_commit) for src in chosen]
    make_fn = functools.partial(_make_worker, cfg, out)

    def stream() -> Iterator[tuple[tuple[_SourceRun, Item | None], dict[str, Any] | None]]:
        for run in runs:
            for r, item, payload in run.payloads():
                yield (r, item), payload

    current: _SourceRun | None = None
    try:
        for (run, item), result in executor.map_ordered(make_fn, stream()):
            current = run
            if item is None:
                run.finish()
            else:
                assert result is not None
                run.add(item, result)
    except (Rejected, AccountingError):
        for run in runs:
            run.abort()
        raise
    except Exception as err:
        for run in runs:
            run.abort()
        where = f"source {current.src.name!r}: " if current else ""
        raise BuildError(f"{where}unexpected {type(err).__name__}: {err}") from err
    stats = [run.stats for run in runs if run.stats is not None]
    return stats, {"synthesis_calls": sum(r.tts_calls for r in runs),
                   "cache_hits": sum(r.tts_hits for r in runs)}


def prepare(cfg: CorpusConfig, out: str, stage: str = DEFAULT_STAGE,
            stages: list[StageRecipe] | None = None) -> CorpusConfig:
    """Set OUT up for a build: folders, leftovers of a killed run removed, the config saved.
    With stages, speech questions come from the recipes (2.2), so the ingest pool is unspoken."""
    if stages:
        cfg = cfg.model_copy(deep=True)
        cfg.transforms.speech.enabled = False
    for folder in (uri.join(out, stage), uri.join(out, REJECTS_DIR)):
        uri.makedirs(folder)
        uri.remove_stale_temps(folder)
    uri.write_bytes_atomic(uri.join(out, "corpus.yaml"), dump_config(cfg).encode())
    return cfg


def finish(cfg: CorpusConfig, out: str, stage: str, started: float, stats: list[SourceStats],
           tts: dict[str, int], stage_summaries: dict[str, dict[str, Any]],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the build report (with `extra`'s entries) and the data-mix report; return the
    build report."""
    report = {
        "corpus": cfg.name,
        "stage": stage,
        "config_fingerprint": cfg.fingerprint(),
        "code_version": code_version(),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "sources": {st.name: st.to_json() for st in stats},
        "totals": {
            "inputs": sum(s.inputs for s in stats),
            "written": sum(s.written for s in stats),
            "rejected": sum(s.rejected for s in stats),
            "shard_bytes": sum(s.shard_bytes for s in stats),
            "parts": sum(s.parts for s in stats),
        },
    }
    report["accounted"] = all(v["accounted"] for v in report["sources"].values())
    tts = dict(tts)
    for st in stage_summaries.values():
        for k in ("synthesis_calls", "cache_hits"):
            tts[k] += st["tts"][k]
    report["tts"] = tts
    report["stages"] = stage_summaries
    report.update(extra or {})
    report["duration_s"] = round(time.time() - started, 3)
    uri.write_bytes_atomic(uri.join(out, "report", "build_report.json"),
                           (json.dumps(report, indent=2) + "\n").encode())
    write_report(out)
    return report


def build(cfg: CorpusConfig, out: str, stage: str = DEFAULT_STAGE, overwrite: bool = False,
          progress: Progress | None = None, executor: Executor | None = None,
          stages: list[StageRecipe] | None = None) -> dict[str, Any]:
    """Build every source of `cfg` into `out/<stage>/`, then the `stages` from those shards;
    write and return the build report. (flows.nightly runs the same steps as Prefect tasks.)"""
    started = time.time()
    cfg = prepare(cfg, out, stage, stages)
    stats, tts = ingest(cfg, out, stage, overwrite, progress, executor)
    summaries = {r.stage: build_stage(cfg, out, r, ingest_stage=stage, progress=progress)
                 for r in stages or []}
    return finish(cfg, out, stage, started, stats, tts, summaries)
