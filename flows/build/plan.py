"""Planning a source's partitions in one process (the driver or the flow's): ranges of inputs,
duplicate ids decided on disk, the leading ranges a rerun keeps, and the accounting that every
input read ends in exactly one part. The writing side is flows.build.partitions.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flows.build.content import ContentDecider
from schemas.config import CorpusConfig, SourceConfig
from schemas.manifest import AccountingError, ShardManifest
from schemas.params import LimitsConfig
from schemas.recipes import max_tokens_for
from schemas.rejects import Rejected
from storage.dedupe import KeyStore
from storage.parts import (
    delete_part,
    delete_ranges,
    iter_manifests,
    part_name,
    read_manifest,
    remove_part_temps,
    verify_part,
)
from storage.readers import read_source
from storage.shards import sample_key

DEFAULT_STAGE = "ingest"


class BuildError(RuntimeError):
    """The build cannot go on; the message says what to do."""


def range_size(cfg: CorpusConfig) -> int:
    """Inputs per range: a range's parts are written by one worker. With few rejects a range is
    one shard of max_samples samples."""
    return cfg.shard.max_samples


# Source fields added after builds existed (issue 27's layouts); see source_fingerprint.
_LATER_SOURCE_FIELDS = ("preset", "columns", "ocr_prompt", "prompts", "prompt_seed", "transcript",
                        "audio_ext")


def source_fingerprint(cfg: CorpusConfig, src: SourceConfig) -> str:
    """What changes a source's output: its own config, shard, media, sample and transform
    settings."""
    source = src.model_dump(mode="json")
    for name in _LATER_SOURCE_FIELDS:  # at their defaults: parts built before they existed stay
        if source.get(name) == SourceConfig.model_fields[name].get_default(
                call_default_factory=True):
            source.pop(name, None)
    parts = {"source": source,
             "shard": cfg.shard.model_dump(), "media": cfg.media.model_dump(),
             "transforms": cfg.transforms.model_dump(mode="json"),
             # the budget as resolved, whether or not prepare() wrote it down
             "sample": {"max_tokens": max_tokens_for(cfg.sample.max_tokens)}}
    if cfg.limits != LimitsConfig():  # only when set: parts built before limits existed stay
        parts["limits"] = cfg.limits.model_dump()
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    # What the partitions' writers did (tasks, transforms, CPU, memory): for the build report's
    # `partitions` entry, not the source's figures.
    work: dict[str, Any] = field(default_factory=dict, compare=False)

    def add_manifest(self, m: ShardManifest) -> None:
        """Count a committed part (its manifest with its samples)."""
        self.inputs += m.inputs
        self.written += m.count
        self.rejected += m.rejected
        self.reasons.update(m.reject_reasons)
        self.members.update(m.member_counts)
        self.shard_bytes += m.bytes
        self.parts += 1
        for s in m.samples:
            self.languages[s.language] += 1
            if s.speech:
                self.speech["spoken"] += s.speech["spoken"]
                self.speech["typed"] += s.speech["typed"]
                self.speech.update({f"kept:{k}": v for k, v in s.speech["kept_as_text"].items()})

    def merge(self, other: SourceStats) -> None:
        for name in ("inputs", "written", "rejected", "parts", "parts_reused", "shard_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("reasons", "members", "languages", "speech"):
            getattr(self, name).update(getattr(other, name))

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

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> SourceStats:
        return cls(name, d["kind"], d["inputs"], d["written"], d["rejected"],
                   Counter(d["reject_reasons"]), d["parts"], d["parts_reused"], d["shard_bytes"],
                   Counter(d["members"]), Counter(d["languages"]),
                   Counter(d.get("speech_questions", {})))


@dataclass
class Partition:
    """Inputs [start, end) of a source: whole ranges (the last one may end at the source's end).
    Each input: index, raw, lineage, record_id, and either `record` (its JSON; with `id` and
    `key`), or `light` (with `id` and `key`: a record the worker makes from the raw, see
    storage.readers.parse_input), or `error` (reason, detail) decided by the planner."""

    source: str
    start: int
    end: int
    inputs: list[dict[str, Any]] = field(default_factory=list)


def leading_ranges(manifests: list[ShardManifest], fp: str, size: int,
                   verify: Callable[[ShardManifest], bool] | None = None) -> list[ShardManifest]:
    """The committed parts of config `fp` that make whole ranges of `size` inputs from input 0 on
    (and pass `verify`), in order. The last range may end short of its size: the source's end
    when nothing follows it in the source (the caller checks), or a writer cut short."""
    kept: list[ShardManifest] = []
    for m in manifests:
        end = kept[-1].input_end if kept else 0
        k = end // size if end % size == 0 else kept[-1].part
        sub = 0 if end % size == 0 else (kept[-1].sub or 0) + 1
        if (m.config_fingerprint != fp or m.part != k or m.sub != sub or m.input_start != end
                or m.input_end > (k + 1) * size or (verify is not None and not verify(m))):
            break
        kept.append(m)
    return kept


def _check_inputs(src: SourceConfig, kept: list[ShardManifest], limits: LimitsConfig | None = None
                  ) -> tuple[int | None, bool]:
    """(the first kept part whose inputs changed since, or None; whether the source has an input
    after the last kept part)."""
    if not kept:
        return None, True
    end = kept[-1].input_end
    j, h = 0, hashlib.sha256()
    for item in read_source(src, start=end, limits=limits):
        if item.index >= end:
            return None, True
        data = item.raw.encode("utf-8", "surrogateescape")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        if item.index + 1 == kept[j].input_end:
            if h.hexdigest() != kept[j].input_sha256:
                return j, True
            j, h = j + 1, hashlib.sha256()
    return (j if j < len(kept) else None), False


class SourcePlanner:
    """The driver's side of one source: what a rerun keeps, the partitions to write, and the
    accounting of what the workers wrote."""

    def __init__(self, cfg: CorpusConfig, src: SourceConfig, out: str,
                 stage: str = DEFAULT_STAGE, overwrite: bool = False,
                 content: ContentDecider | None = None, light: bool | None = None) -> None:
        self.cfg, self.src, self.out, self.stage = cfg, src, out, stage
        # Light planning (the default when no content decision needs the parsed record): the
        # records that surely parse are handed out as their raw text and made on the workers;
        # here only their ids (for the duplicate decision) and the rejects are found.
        self.light = content is None if light is None else light
        if self.light and content is not None:
            raise ValueError("content decisions need the parsed records: light=False with them")
        self.fp = source_fingerprint(cfg, src)
        self.size = range_size(cfg)
        # Content decisions (flows.build.content): an input whose decision an earlier source
        # changed since the last run is rebuilt from its range on.
        self.content = content
        self.rank = [s.name for s in cfg.sources].index(src.name)
        self._displaced = content.index.first_displaced(self.rank) if content else None
        kept = self._resume_point(overwrite)
        self.resume = kept[-1].input_end if kept else 0
        self.stats = SourceStats(src.name, src.kind, parts_reused=len(kept))
        for m in kept:  # one manifest at a time: the languages and speech are per sample
            name = part_name(m.source, m.part, m.sub)
            self.stats.add_manifest(read_manifest(out, stage, f"{name}.manifest.json"))
        self.inputs_read = self.resume  # grows as the planner reads
        self.keys = KeyStore.for_source(out, stage, src.name, self.fp)
        self.keys.reset_from(self.resume)
        if content is not None:
            content.index.reset_from(self.rank, self.resume)
        self._planned: dict[int, int] = {}  # start -> end of the partitions handed out
        self._done: set[int] = set()
        # What the partitions' writers did: the build report's `partitions` entry.
        self.work = {"tasks": 0, "records": 0, "transformed": 0, "inputs_kept": self.resume,
                     "worker_cpu_s": 0.0, "worker_peak_rss_mb": 0.0,
                     "media_cache_hits": 0, "media_cache_misses": 0,
                     # parquet / tar reads of embedded media: row groups, batches, cells, ...
                     "embedded_reads": {}}
        self.tts = {"synthesis_calls": 0, "cache_hits": 0}

    def _resume_point(self, overwrite: bool) -> list[ShardManifest]:
        out, stage, src = self.out, self.stage, self.src
        remove_part_temps(out, stage, src.name)  # nothing writes this source yet
        existing = list(iter_manifests(out, stage, src.name, samples=False))
        kept = leading_ranges(existing, self.fp, self.size,
                              verify=lambda m: verify_part(out, m) is None)
        if len(existing) > len(kept):  # the first part not kept: of another config?
            m = existing[len(kept)]
            if m.config_fingerprint != self.fp and not overwrite:
                raise BuildError(
                    f"{out}/{stage} holds shards of source {src.name!r} built with a different "
                    f"config (fingerprint {m.config_fingerprint}, now {self.fp}). Pass "
                    f"--overwrite to rebuild them, or build into another --out.")
        changed, more = _check_inputs(src, kept, self.cfg.limits)
        if changed is not None:  # inputs edited since: from that part's range on
            kept = [m for m in kept if m.part < kept[changed].part]
        if self._displaced is not None and kept and kept[-1].input_end > self._displaced:
            kept = [m for m in kept if m.part < self._displaced // self.size]
            more = True
        if kept and more and kept[-1].input_end % self.size:  # a range cut short
            kept = [m for m in kept if m.part < kept[-1].part]
        # Every input is in a kept part: nothing to plan, unless the key store must catch up.
        self.complete = bool(kept) and not more and changed is None
        first = kept[-1].part + 1 if kept else 0
        kept_ids = {id(m) for m in kept}
        for m in existing:  # of another layout or config, or stale beside the kept ones
            if id(m) not in kept_ids and (m.sub is None or m.part < first):
                delete_part(out, stage, src.name, m.part, m.sub)
        delete_ranges(out, stage, src.name, first)
        return kept

    def partitions(self, ranges: int = 1) -> Iterator[Partition]:
        """The partitions of the inputs after the resume point, `ranges` ranges each, in input
        order, read one at a time (inputs before the resume point that the key store has not
        seen are parsed for their ids only)."""
        if ranges < 1:
            raise ValueError(f"a partition holds at least one range, got {ranges}")
        covered = min(self.keys.covered, self.content.index.covered(self.rank)
                      if self.content else self.keys.covered)
        if self.complete and covered >= self.resume:
            return
        src, keys, start = self.src, self.keys, min(covered, self.resume)
        content = self.content
        span = ranges * self.size
        cur: Partition | None = None
        for item in read_source(src, start=start, limits=self.cfg.limits, light=self.light):
            i = item.index
            if i < start:
                continue
            first = None
            if item.error is None and (item.record is not None or item.light):
                rid = item.record.id if item.record is not None else item.record_id
                assert rid is not None
                try:
                    key = sample_key(src.name, rid)
                    record_json = None if item.record is None else \
                        item.record.model_dump_json(by_alias=True)
                except Exception as err:  # noqa: BLE001 - that input's reject, not the build's
                    item.error = Rejected("internal_error", f"{type(err).__name__}: {err} "
                                                            f"(source {src.name!r}, input {i})")
                    item.record, item.light = None, False
                else:
                    first = keys.claim(key, i)
            hashes = decided = None
            if first is None and item.error is None and content is not None:
                assert item.record is not None
                hashes, decided = content.decide(src, i, item.record)
            if (i + 1) % self.size == 0:
                keys.checkpoint(i + 1)
                if content is not None:
                    content.index.checkpoint(self.rank, i + 1)
            if i < self.resume:
                continue
            if cur is None or i >= cur.start + span:
                if cur is not None:
                    yield self._hand_out(cur)
                cur = Partition(src.name, i, i)
            inp: dict[str, Any] = {"index": i, "raw": item.raw, "lineage": item.lineage,
                                   "record_id": item.record_id}
            if item.error is not None:
                inp["error"] = (item.error.reason, item.error.detail)
            elif first is not None:
                inp["error"] = ("duplicate_id", f"id {rid!r} (key {key}) appeared "
                                                f"earlier in this source (input {first})")
            elif decided is not None:
                inp["error"] = decided
            elif item.light:
                inp.update(id=rid, key=key, light=True)
            else:
                assert item.record is not None
                inp.update(id=rid, key=key, record=record_json)
                if hashes:
                    inp["media_sha256"] = hashes
            cur.inputs.append(inp)
            cur.end = i + 1
            self.inputs_read = i + 1
        if cur is not None:
            yield self._hand_out(cur)
        keys.checkpoint(self.inputs_read)
        if content is not None:
            content.index.checkpoint(self.rank, self.inputs_read)

    def _hand_out(self, part: Partition) -> Partition:
        self._planned[part.start] = part.end
        self.work["records"] += sum("record" in p or "light" in p for p in part.inputs)
        return part

    def add(self, start: int, end: int, result: dict[str, Any]) -> None:
        """Account for partition [start, end) as its writer reported it."""
        st = SourceStats.from_json(self.src.name, result["stats"])
        if self._planned.get(start) != end or start in self._done:
            raise AccountingError(f"source {self.src.name!r}: a result for inputs {start}-{end}, "
                                  "which were not handed out once; this is a bug")
        if st.inputs != end - start or st.inputs != st.written + st.rejected:
            raise AccountingError(
                f"source {self.src.name!r}: inputs {start}-{end} ({end - start}) came back as "
                f"{st.inputs} in parts, {st.written} written + {st.rejected} rejected. Nothing "
                "may be lost; this is a bug.")
        self._done.add(start)
        self.stats.merge(st)
        self.work["tasks"] += 1
        self.work["transformed"] += result["transformed"]
        self.work["worker_cpu_s"] += result["cpu_s"]
        self.work["worker_peak_rss_mb"] = max(self.work["worker_peak_rss_mb"],
                                              result["peak_rss_mb"])
        for k in self.tts:
            self.tts[k] += result["tts"][k]
        cache = result.get("media_cache") or {}
        self.work["media_cache_hits"] += cache.get("hits", 0)
        self.work["media_cache_misses"] += cache.get("misses", 0)
        reads = self.work["embedded_reads"]
        for k, v in (result.get("embedded_reads") or {}).items():
            reads[k] = reads.get(k, 0) + v

    def finish(self) -> SourceStats:
        """Check that every input read is in exactly one committed part; the source's stats."""
        self.keys.close()
        missing = sorted(set(self._planned) - self._done)
        st = self.stats
        if missing or st.inputs != self.inputs_read or st.inputs != st.written + st.rejected:
            raise AccountingError(
                f"source {self.src.name!r}: read {self.inputs_read} inputs, parts account for "
                f"{st.inputs}, written {st.written} + rejected {st.rejected}"
                + (f"; partitions starting at {missing[:5]} never came back" if missing else "")
                + ". Nothing may be lost; this is a bug.")
        return st

    def abort(self) -> None:
        self.keys.close()
