"""Partitions: a source's inputs cut into fixed ranges, planned in one process, written anywhere.

A source's inputs are cut into ranges of `range_size(cfg)` inputs (the shard's max_samples):
range k holds inputs [k*R, (k+1)*R). A range is written as one or more parts (storage.parts):
a part closes at max_samples samples, before it would pass max_bytes, and at its range's end.
Where each part starts therefore depends only on the inputs and the config, not on which
worker writes it or when: any worker can write any range, and the bytes are those of the
in-process build.

The planner (`SourcePlanner` in flows.build.plan, in the driver or the flow's process) reads the
source once, in order: it finds each input's id and whether it is a record, decides duplicate
ids (storage.dedupe: the first input with a key claims it, on disk) and hands out partitions,
runs of whole ranges with their inputs (the raw text, for the input hash and the reject store,
and the record, or the reason it is rejected). With no content decision to make, a record that
surely parses travels as its raw text only (`light`) and the worker makes it
(storage.readers.parse_input), so the driver's cost per input is the id, not the record.
A worker (`write_partition`) transforms a partition's records, writes its ranges' parts
straight to OUT and returns what they account for; the planner adds that up
(`SourcePlanner.add`) and checks that every input read is in exactly one part
(`SourcePlanner.finish`). Nothing the planner holds grows with the source: the current
partition, the counters, and one (start, end) per partition.

Reruns: the planner keeps the leading ranges whose parts are all committed, match their
checksums and were built from the same inputs and config; the resume point is a range
boundary (a final range that the source has grown past since is built again, as a fresh build
would), every part after it is deleted, and the rest is planned. A partition's writer clears its
own ranges first, so a task retried after its worker died starts clean while other workers
write other ranges of the same source.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from flows.build.executors import failed_result
from flows.build.plan import DEFAULT_STAGE, Partition, SourceStats, range_size, source_fingerprint
from schemas.config import CorpusConfig, SourceConfig
from schemas.rejects import Rejected, RejectRecord
from storage.parts import (
    PartWriter,
    delete_ranges,
)
from storage.readers import parse_input


class _RangeWriter:
    """Writes a partition's inputs into its ranges' parts, closing parts by the shard limits
    and at range boundaries."""

    def __init__(self, cfg: CorpusConfig, out: str, stage: str, source: str, fp: str) -> None:
        self.cfg, self.out, self.stage, self.source, self.fp = cfg, out, stage, source, fp
        self.size = range_size(cfg)
        self.writer: PartWriter | None = None
        self.next_sub: tuple[int, int] = (-1, 0)  # (range, its next sub-part)
        self.stats = SourceStats(source, cfg.source(source).kind)

    def _open(self, index: int) -> PartWriter:
        if self.writer is None:
            k = index // self.size
            sub = self.next_sub[1] if self.next_sub[0] == k else 0
            self.writer = PartWriter(self.out, self.stage, self.source, k, index, self.fp,
                                     sub=sub)
            self.next_sub = (k, sub + 1)
        return self.writer

    def _commit(self) -> None:
        assert self.writer is not None
        self.stats.add_manifest(self.writer.commit())
        self.writer = None

    def add(self, inp: dict[str, Any], result: dict[str, Any]) -> None:
        index, limits = inp["index"], self.cfg.shard
        if self.writer is not None and index // self.size != self.writer.part:
            self._commit()
        if result["ok"]:
            members = list(zip(result["suffixes"], result["payloads"], strict=True))
            size = sum(512 + len(d) + (-len(d) % 512) for _, d in members)
            if self.writer is not None and self.writer.samples and \
                    self.writer.bytes + size > limits.max_bytes:
                self._commit()
            w = self._open(index)
            w.add_input(index, inp["raw"])
            w.add_sample(inp["key"], inp["id"], index, members, **result["info"])
        else:
            w = self._open(index)
            w.add_input(index, inp["raw"])
            w.add_reject(RejectRecord.from_rejection(
                Rejected(result["reason"], result["detail"]), source=self.source, index=index,
                lineage=inp["lineage"], record_id=inp["record_id"], raw=inp["raw"]))
        if len(w.samples) >= limits.max_samples:
            self._commit()

    def finish(self) -> None:
        if self.writer is not None:
            self._commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def light_record(src: SourceConfig, inp: dict[str, Any]
                 ) -> tuple[str | None, dict[str, Any] | None]:
    """(the record's JSON, None), or (None, its failed result), of a light input: made from
    the raw text as the planner would have (the planner proved it a record; a reject here is
    the one its full read would have given, named the same)."""
    item = parse_input(src, inp["raw"], inp["index"], inp["lineage"])
    if item.error is not None:
        return None, failed_result(item.error.reason, item.error.detail)
    assert item.record is not None
    try:
        return item.record.model_dump_json(by_alias=True), None
    except Exception as err:  # noqa: BLE001 - as the planner words it
        return None, failed_result("internal_error", f"{type(err).__name__}: {err} (source "
                                                     f"{src.name!r}, input {inp['index']})")


_TRANSFORMS: dict[tuple[str, str], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _transform_fn(cfg: CorpusConfig, out: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The per-record work, built once per process (it imports torch and the transforms, and
    holds the TTS backend once loaded)."""
    key = (cfg.fingerprint(), out)
    if key not in _TRANSFORMS:
        from flows.build.work import Worker, work_context

        _TRANSFORMS.clear()
        _TRANSFORMS[key] = Worker(work_context(cfg, out))
    return _TRANSFORMS[key]


def write_partition(cfg: CorpusConfig, out: str, part: Partition,
                    stage: str = DEFAULT_STAGE) -> dict[str, Any]:
    """Transform `part`'s records and write its ranges' parts to OUT (what a worker runs);
    return what they account for, for `SourcePlanner.add`."""
    t0 = time.process_time()
    src = cfg.source(part.source)
    size = range_size(cfg)
    delete_ranges(out, stage, src.name, part.start // size, (part.end - 1) // size)
    writer = _RangeWriter(cfg, out, stage, src.name, source_fingerprint(cfg, src))
    fn = None
    transformed = calls = hits = c_hits = c_misses = 0
    reads: Counter[str] = Counter()  # what the partition read of embedded media (parquet, tar)
    try:
        for inp in part.inputs:
            record, failed = (light_record(src, inp) if inp.get("light")
                              else (inp.get("record"), None))
            if "error" in inp:
                result = failed_result(*inp["error"])
            elif failed is not None:
                result = failed
            else:
                fn = fn or _transform_fn(cfg, out)
                result = fn({"source": src.name, "index": inp["index"], "record": record,
                             "media_sha256": inp.get("media_sha256")})
                transformed += 1
                calls += result.get("tts_calls", 0)
                hits += result.get("tts_hits", 0)
                c_hits += result.get("cache_hits", 0)
                c_misses += result.get("cache_misses", 0)
                reads.update(result.get("embedded_reads") or {})
            writer.add(inp, result)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {"source": src.name, "start": part.start, "end": part.end,
            "stats": writer.stats.to_json(), "transformed": transformed,
            "tts": {"synthesis_calls": calls, "cache_hits": hits},
            "media_cache": {"hits": c_hits, "misses": c_misses},
            "embedded_reads": dict(sorted(reads.items())),
            "cpu_s": time.process_time() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
