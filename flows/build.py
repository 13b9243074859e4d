"""The ingest build: every source, read -> check -> shard, resumable, with its accounting.

Each source is written as numbered parts (see storage.parts). A rerun keeps the parts whose
manifest, checksum, config fingerprint and input hash still hold, and continues after them, so
a crash costs at most one part and an appended source costs only its new parts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.config import CorpusConfig, SourceConfig, dump_config
from schemas.manifest import AccountingError, ShardManifest
from schemas.rejects import Rejected, RejectRecord
from schemas.version import code_version
from storage import uri
from storage.media import fetcher
from storage.parts import (
    REJECTS_DIR,
    PartWriter,
    delete_part,
    list_manifests,
    orphan_parts,
    verify_part,
)
from storage.readers import Item, default_media_root, read_source
from storage.shards import sample_key
from transforms.media import passthrough_members

DEFAULT_STAGE = "ingest"
# (source, inputs, written, rejected, final): called per input and once when a source is done
Progress = Callable[[str, int, int, int, bool], None]


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

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "inputs": self.inputs, "written": self.written,
            "rejected": self.rejected, "reject_reasons": dict(sorted(self.reasons.items())),
            "parts": self.parts, "parts_reused": self.parts_reused,
            "shard_bytes": self.shard_bytes, "members": dict(sorted(self.members.items())),
            "languages": dict(sorted(self.languages.items())),
            "accounted": self.inputs == self.written + self.rejected,
        }


def source_fingerprint(cfg: CorpusConfig, src: SourceConfig) -> str:
    """What changes a source's output: its own config, shard and media settings."""
    blob = json.dumps({"source": src.model_dump(mode="json"),
                       "shard": cfg.shard.model_dump(), "media": cfg.media.model_dump()},
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


def _resume_point(out: str, stage: str, src: SourceConfig, fp: str,
                  overwrite: bool) -> list[ShardManifest]:
    existing = list_manifests(out, stage, src.name)
    for part in orphan_parts(out, stage, src.name, {m.part for m in existing}):
        delete_part(out, stage, src.name, part)
    kept: list[ShardManifest] = []
    for m in existing:
        if m.config_fingerprint != fp and not overwrite:
            raise BuildError(
                f"{out}/{stage} holds shards of source {src.name!r} built with a different "
                f"config (fingerprint {m.config_fingerprint}, now {fp}). Pass --overwrite to "
                f"rebuild them, or build into another --out."
            )
        expected_start = kept[-1].input_end if kept else 0
        if (m.config_fingerprint != fp or m.part != len(kept) or m.input_start != expected_start
                or verify_part(out, m) is not None):
            break
        kept.append(m)
    changed = _input_digests(src, kept)
    if changed is not None:
        kept = kept[:changed]
    for m in existing[len(kept):]:
        delete_part(out, stage, src.name, m.part)
    return kept


def _process(item: Item, src: SourceConfig, cfg: CorpusConfig, fetch: Callable[[str], bytes],
             seen: set[str]) -> tuple[str, str, list[tuple[str, bytes]]]:
    """One input to (key, id, members); raises Rejected for an expected drop."""
    if item.error is not None:
        raise item.error
    rec = item.record
    assert rec is not None
    key = sample_key(src.name, rec.id)
    if key in seen:
        raise Rejected("duplicate_id", f"id {rec.id!r} (key {key}) already written by this source")
    members, meta = passthrough_members(rec, fetch, cfg.media.max_image_pixels)
    for k, v in meta.items():
        setattr(rec.meta, k, v)
    try:
        js = json.dumps(rec.to_json(), ensure_ascii=False, sort_keys=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise Rejected("invalid_utf8", f"a string holds an unpaired surrogate: {err}") from None
    return key, rec.id, [("json", js), *members]


def build_source(cfg: CorpusConfig, src: SourceConfig, out: str, stage: str = DEFAULT_STAGE,
                 overwrite: bool = False, progress: Progress | None = None) -> SourceStats:
    fp = source_fingerprint(cfg, src)
    kept = _resume_point(out, stage, src, fp, overwrite)
    resume = kept[-1].input_end if kept else 0
    seen = {s.key for m in kept for s in m.samples}
    fetch = fetcher(default_media_root(src))
    limits = cfg.shard
    writer = PartWriter(out, stage, src.name, len(kept), resume, fp)
    made: list[ShardManifest] = []
    n_in, n_ok, n_rej = resume, sum(m.count for m in kept), sum(m.rejected for m in kept)
    try:
        for item in read_source(src, start=resume):
            if item.index < resume:
                continue
            try:
                key, rid, members = _process(item, src, cfg, fetch, seen)
                size = sum(512 + len(d) + (-len(d) % 512) for _, d in members)
                if writer.samples and writer.bytes + size > limits.max_bytes:
                    made.append(writer.commit())
                    writer = PartWriter(out, stage, src.name, len(kept) + len(made), item.index, fp)
                writer.add_input(item.index, item.raw)
                writer.add_sample(key, rid, item.index, members, item.record.meta.language)
                seen.add(key)
                n_ok += 1
            except Rejected as err:
                writer.add_input(item.index, item.raw)
                writer.add_reject(RejectRecord.from_rejection(
                    err, source=src.name, index=item.index, lineage=item.lineage,
                    record_id=item.record_id, raw=item.raw))
                n_rej += 1
            n_in += 1
            if progress:
                progress(src.name, n_in, n_ok, n_rej, False)
            if len(writer.samples) >= limits.max_samples or writer.inputs >= 4 * limits.max_samples:
                made.append(writer.commit())
                writer = PartWriter(out, stage, src.name, len(kept) + len(made), item.index + 1, fp)
        if writer.inputs:
            made.append(writer.commit())
        else:
            writer.abort()
        if progress:
            progress(src.name, n_in, n_ok, n_rej, True)
    except (Rejected, AccountingError):
        writer.abort()
        raise
    except Exception as err:
        writer.abort()
        raise BuildError(f"source {src.name!r}: unexpected {type(err).__name__}: {err}") from err
    return _stats(src, kept, made, n_in)


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
        st.parts += 1
    if st.inputs != inputs_read or st.inputs != st.written + st.rejected:
        raise AccountingError(
            f"source {src.name!r}: read {inputs_read} inputs, parts account for {st.inputs}, "
            f"written {st.written} + rejected {st.rejected}. Nothing may be lost; this is a bug."
        )
    return st


def build(cfg: CorpusConfig, out: str, stage: str = DEFAULT_STAGE, overwrite: bool = False,
          progress: Progress | None = None) -> dict[str, Any]:
    """Build every source of `cfg` into `out/<stage>/`; write and return the build report."""
    started = time.time()
    uri.makedirs(uri.join(out, stage))
    uri.makedirs(uri.join(out, REJECTS_DIR))
    for folder in (uri.join(out, stage), uri.join(out, REJECTS_DIR)):
        uri.remove_stale_temps(folder)
    uri.write_bytes_atomic(uri.join(out, "corpus.yaml"), dump_config(cfg).encode())
    stats = [build_source(cfg, src, out, stage, overwrite, progress) for src in cfg.sources]
    report = {
        "corpus": cfg.name,
        "stage": stage,
        "config_fingerprint": cfg.fingerprint(),
        "code_version": code_version(),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 3),
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
    uri.write_bytes_atomic(uri.join(out, "report", "build_report.json"),
                           (json.dumps(report, indent=2) + "\n").encode())
    return report
