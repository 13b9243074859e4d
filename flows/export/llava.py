"""LLaVA's format: one LLaVA/ShareGPT4V JSON list with images/ and videos/ beside it; a spoken
question goes back to its text (LLaVA has no audio).
"""
from __future__ import annotations

import re
from typing import Any

from flows.export.media import MediaFiles, NotExported, safe_name


def llava_record(rec: dict[str, Any], members: dict[str, bytes], media: MediaFiles, key: str
                 ) -> dict[str, Any]:
    """The sample as LLaVA reads it; spoken questions go back to their text."""
    meta = rec.get("meta") or {}
    convs = [dict(t) for t in rec["conversations"]]
    if rec.get("audio"):
        spoken = {q.get("member"): q.get("text") for q in (meta.get("speech") or {}).get("questions", [])}
        names = (meta.get("members") or {}).get("audio") or []
        texts = [spoken.get(n) for n in names]
        if len(texts) != len(rec["audio"]) or any(t is None for t in texts):
            raise NotExported("audio_not_in_format", f"{meta.get('task', '?')} sample with "
                                                     f"{len(rec['audio'])} audio members")
        it = iter(texts)
        for t in convs:
            t["value"] = re.sub(r"<audio>", lambda _m: next(it), t["value"])
    folder = safe_name(str(rec.get("set") or meta.get("source", "set")))
    out: dict[str, Any] = {"id": rec["id"]}
    if rec.get("image"):
        images = media.images(rec, members, folder, key)
        out["image"] = images if isinstance(rec["image"], list) else images[0]
    if rec.get("video"):
        out["video"] = media.video(rec, members, folder, key)
    out["conversations"] = convs
    return out
