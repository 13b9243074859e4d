"""Acting on failures at their grain: a failing sample is taken out of its shard (the original
kept in quarantine, a reject line with the rule's reason), a damaged shard is moved to the
quarantine whole. Nothing is deleted.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from schemas.manifest import ShardManifest
from schemas.rejects import REASONS, RejectRecord
from storage import uri
from storage.parts import REJECTS_DIR
from storage.shards import TarShardWriter, iter_samples
from storage.verdict import VALIDATION_DIR


def _member_kind(suffix: str) -> str:
    return suffix.split("_", 1)[0].split(".", 1)[0]


def remove_samples(out: str, stage: str, shard: str, failing: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
    """Rewrite `shard` without the `failing` samples (key -> id, reasons, labels).

    The original tar and manifest are copied to the quarantine first (nothing is lost), the
    removed samples become reject lines with the rule's reason, and the manifest is rewritten
    last: its accounting still holds (count + rejected == inputs).
    """
    base = shard[: -len(".tar")]
    folder = uri.join(out, stage)
    dest = os.path.join(out, VALIDATION_DIR, "quarantine", stage)
    os.makedirs(dest, exist_ok=True)
    mpath = uri.join(folder, f"{base}.manifest.json")
    m = ShardManifest.from_json_bytes(uri.read_bytes(mpath))
    k = 0  # a shard repaired twice keeps both originals
    while os.path.exists(os.path.join(dest, f"{base}{f'.{k}' if k else ''}.tar")):
        k += 1
    kept_as = f"{base}{f'.{k}' if k else ''}"
    for name, to in ((shard, f"{kept_as}.tar"), (f"{base}.manifest.json", f"{kept_as}.manifest.json")):
        shutil.copyfile(os.path.join(out, stage, name), os.path.join(dest, to))
    entries = {e.key: e for e in m.samples}
    kept, rejects = [], []
    writer = TarShardWriter(uri.join(folder, shard))
    try:
        for key, members in iter_samples(uri.join(folder, shard)):
            bad = failing.get(key)
            if bad is None:
                writer.write_sample(key, [(s, members[s]) for s in entries[key].members])
                kept.append(entries[key])
                continue
            lineage = ""
            try:
                lineage = str((json.loads(members.get("json", b"{}")).get("meta") or {})
                              .get("lineage", ""))
            except ValueError:
                pass
            detail = "the validation gate: " + "; ".join(bad["labels"])
            if bad.get("first_at"):
                detail += f" (first in {bad['first_at'][0]} as {bad['first_at'][1]})"
            e = entries.get(key)
            rejects.append(RejectRecord(
                source=m.source, index=e.index if e else -1, lineage=lineage,
                reason=bad["reasons"][0] if bad["reasons"][0] in REASONS else "sample_unreadable",
                detail=detail[:1000], id=bad["id"],
                raw=members.get("json", b"").decode("utf-8", "replace")[:2048]))
        if kept:
            size, sha = writer.close()
        else:
            writer.abort()
            uri.remove(uri.join(folder, shard))
            size, sha = 0, None
    except BaseException:
        writer.abort()
        raise
    rel = f"{base}.rejects.jsonl" if stage == "ingest" else f"{stage}/{base}.rejects.jsonl"
    rpath = uri.join(out, REJECTS_DIR, rel)
    old = uri.read_bytes(rpath) if m.rejects_file and uri.exists(rpath) else b""
    lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects)
    if stage != "ingest":
        uri.makedirs(uri.join(out, REJECTS_DIR, stage))
    uri.write_bytes_atomic(rpath, old + lines.encode("utf-8"))
    members: Counter[str] = Counter(_member_kind(s) for e in kept for s in e.members)
    reasons = Counter(m.reject_reasons)
    reasons.update(r.reason for r in rejects)
    m = m.model_copy(update={
        "shard": shard if kept else None, "count": len(kept), "bytes": size, "sha256": sha,
        "samples": kept, "rejected": m.rejected + len(rejects),
        "reject_reasons": dict(sorted(reasons.items())), "rejects_file": rel,
        "member_counts": dict(sorted(members.items()))})
    uri.write_bytes_atomic(mpath, m.to_json_bytes())
    entry = {"shard": shard, "stage": stage, "removed": len(rejects), "kept": len(kept),
             "by_reason": dict(Counter(r.reason for r in rejects)), "sha256": sha,
             "samples": [{"key": k, "id": v["id"], "reasons": v["reasons"]}
                         for k, v in sorted(failing.items())][:100],
             "original": os.path.join(dest, f"{kept_as}.tar"),
             "removed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with open(os.path.join(dest, f"{kept_as}.removed.json"), "w") as f:
        json.dump(entry, f, indent=1)
    return entry


def quarantine(out: str, stage: str, shard: str, failed: list[str]) -> dict[str, Any]:
    """Move a shard and its manifest aside (never delete), with what it failed."""
    base = shard[: -len(".tar")]
    dest = os.path.join(out, VALIDATION_DIR, "quarantine", stage)
    os.makedirs(dest, exist_ok=True)
    for name in (shard, f"{base}.manifest.json"):
        src = os.path.join(out, stage, name)
        if os.path.exists(src):
            shutil.move(src, os.path.join(dest, name))
    rej = os.path.join(out, REJECTS_DIR, f"{base}.rejects.jsonl")
    if stage == "ingest" and os.path.exists(rej):
        shutil.move(rej, os.path.join(dest, f"{base}.rejects.jsonl"))
    marker = os.path.join(out, stage, "_stage.json")
    if os.path.exists(marker):
        os.remove(marker)  # the stage is no longer whole: the next build rebuilds it
    entry = {"shard": shard, "stage": stage, "failed": failed,
             "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with open(os.path.join(dest, f"{base}.failed.json"), "w") as f:
        json.dump(entry, f, indent=1)
    return entry
