"""LLaVA's format: one LLaVA/ShareGPT4V JSON list per stage with its media beside it; a spoken
question goes back to its text (LLaVA has no audio).

LLaVA-1.5's loader (llava/train/train.py) reads one `image` (a str) and no video, so a record
with several images or a video is left out with a counted reason; `--llava-version onevision`
writes them as LLaVA-NeXT/OneVision read them: `image` as a list with one <image> each, and
`video` (under --video_folder) with <image> standing for the whole video.
"""
from __future__ import annotations

import re
from typing import Any

from flows.export.media import MediaFiles, NotExported, safe_name

LLAVA_VERSIONS = ("1.5", "onevision")
_PH = re.compile(r"<(image|video|audio)>")


def llava_record(rec: dict[str, Any], members: dict[str, bytes], media: MediaFiles, key: str,
                 version: str = "1.5") -> dict[str, Any]:
    """The sample as LLaVA reads it; spoken questions go back to their text."""
    meta = rec.get("meta") or {}
    convs = [dict(t) for t in rec["conversations"]]
    many = isinstance(rec.get("image"), list) and len(rec["image"]) > 1
    if version == "1.5" and many:
        raise NotExported("multi_image_not_in_format", f"{len(rec['image'])} images")
    if version == "1.5" and rec.get("video"):
        raise NotExported("video_not_in_format", str(rec["video"]))
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
    if rec.get("video"):  # LLaVA-NeXT takes <image> for the video's frames
        for t in convs:
            t["value"] = t["value"].replace("<video>", "<image>")
    n_images = (len(rec["image"]) if isinstance(rec.get("image"), list) else 1 if rec.get("image")
                else 0) + (1 if rec.get("video") else 0)
    found = [m.group(1) for t in convs for m in _PH.finditer(t["value"])]
    in_answers = any(_PH.search(t["value"]) for t in convs if t.get("from") == "gpt")
    if set(found) - {"image"} or len(found) != n_images or in_answers:
        raise NotExported("placeholder_not_in_format",
                          f"{found} for {n_images} images{' (in an answer)' if in_answers else ''}")
    folder = safe_name(str(rec.get("set") or meta.get("source", "set")))
    out: dict[str, Any] = {"id": rec["id"]}
    if rec.get("image"):
        images = media.images(rec, members, folder, key)
        out["image"] = images if isinstance(rec["image"], list) and version != "1.5" else images[0]
    if rec.get("video"):
        out["video"] = media.video(rec, members, folder, key)
    out["conversations"] = convs
    return out
