"""One shard of a stage exported: the unit of work an executor runs (in this process or on a Ray
worker). Media go straight to their place in the export; the records, meta lines and skips go
to a part file that the driver merges in shard order, so the export's bytes do not depend on
where or in which order the shards ran.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from flows.export.llava import llava_record
from flows.export.media import MediaFiles, NotExported, safe_name
from flows.export.vita import kind_of, vita_record
from storage import uri
from storage.shards import iter_samples


@dataclass(frozen=True)
class ShardTask:
    shard: str          # the shard's URI
    part: str           # the part file to write (local)
    fmt: str            # vita | llava
    media_base: str     # the folder media are written under
    media_prefix: str   # what records put before a path inside media_base
    fps: int
    set_prefix: str = ""  # vita: makes set keys unique to the export
    llava_version: str = "1.5"


@dataclass
class ShardResult:
    samples: int = 0
    records: int = 0
    by_source: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    adjusted: Counter[str] = field(default_factory=Counter)
    sets: dict[str, str] = field(default_factory=dict)   # set key -> source
    no_patch: set[str] = field(default_factory=set)
    kinds: dict[str, str] = field(default_factory=dict)  # source -> kind


def export_shard(task: ShardTask) -> ShardResult:
    """Export one shard; writes task.part (a line per sample: a record with its meta, or a
    skip) atomically, so a retried task rewrites it whole."""
    res = ShardResult()
    media = MediaFiles(task.media_base, task.media_prefix, task.fps)
    tar = task.shard.rsplit("/", 1)[-1]
    tmp = f"{task.part}.tmp"
    os.makedirs(os.path.dirname(task.part), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for key, members in iter_samples(task.shard):
            res.samples += 1
            note = None
            try:
                if "json" not in members:
                    raise NotExported("sample_unreadable", f"{tar}: {key}")
                rec = json.loads(members["json"])
                meta = rec.get("meta") or {}
                src = safe_name(str(meta.get("source") or rec.get("set") or "samples"))
                if task.fmt == "vita":
                    made, note = vita_record(rec, members, media, key, task.set_prefix)
                else:
                    made = llava_record(rec, members, media, key, task.llava_version)
            except NotExported as skip:
                res.skipped[skip.reason] += 1
                f.write(json.dumps({"skip": {"shard": tar, "key": key, "reason": skip.reason,
                                             "detail": skip.detail}}, ensure_ascii=False) + "\n")
                continue
            line = {"id": rec["id"], "set": rec.get("set"), "key": key, "meta": meta}
            if note:
                line["export"] = {"images": "thumbnails", "set": made["set"][0], "why": note}
                res.adjusted["no_patch_thumbnails"] += 1
                res.no_patch.add(made["set"][0])
            f.write(json.dumps({"source": src, "record": made, "meta": line},
                               ensure_ascii=False) + "\n")
            for s in made["set"] if isinstance(made.get("set"), list) else [made.get("set")]:
                if s is not None:
                    res.sets.setdefault(str(s), src)
            res.kinds.setdefault(src, kind_of(meta))
            res.records += 1
            res.by_source[src] += 1
    os.replace(tmp, task.part)
    return res


def shard_count(shard: str) -> int:
    """Samples in a shard, from its manifest (0 when there is none)."""
    man = shard[: -len(".tar")] + ".manifest.json"
    if not uri.exists(man):
        return 0
    return int(json.loads(uri.read_bytes(man)).get("count", 0))
