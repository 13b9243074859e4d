"""Scanning a stage's shards into rows: one metadata row per sample (read from its members, no
media kept) and one row per shard (sha256, size, count and members against the manifest).
Runs on the executor's workers; nothing here calls Great Expectations.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from schemas.contract import record_columns
from storage import uri
from storage.shards import iter_samples, sha256_of
from transforms.video import sample_times

_PH = re.compile(r"<(image|video|audio)>")


def _rms_dbfs(data: bytes) -> tuple[int, float, float]:
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return sr, x.shape[0] / sr if sr else 0.0, 20 * math.log10(rms) if rms > 0 else -200.0


def sample_row(shard: str, key: str, members: dict[str, bytes], speech_sr: int,
               pair_sr: int) -> dict[str, Any]:
    """One sample's metadata as the validation table needs it, read from its members."""
    row: dict[str, Any] = {"shard": shard, "key": key, "has_json": "json" in members,
                           "id": key, "members_ok": False, "tiles_min": None,
                           "tiles_max": None, "sizes_ok": True, "frames": None,
                           "frames_rule_ok": None, "audio_rate_ok": None, "audio_min_s": None,
                           "audio_max_s": None, "audio_min_dbfs": None, "turns_ok": False,
                           "turns_nonempty": False, "placeholders_ok": False, "tokens": None,
                           "source": "", "spoken": 0, "typed": 0}
    if not row["has_json"]:
        return row
    try:
        rec = json.loads(members["json"])
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except ValueError:
        row["has_json"] = False
        return row
    meta = rec.get("meta") or {}
    row["id"], row["source"] = str(rec.get("id")), str(meta.get("source", ""))
    row.update(record_columns(rec))  # turn order, empty turns, placeholders, tokens
    turns = rec.get("conversations") or []
    ph = Counter(m.group(1) for t in turns if isinstance(t, dict)
                 for m in _PH.finditer(str(t.get("value", ""))))
    names = sorted(members)
    tiles = [n for n in names if n.startswith("tile_")]
    frames = [n for n in names if n.startswith("frame_")]
    audio = [n for n in names if n.startswith("audio_")]
    images = rec.get("image") or []
    images = [images] if isinstance(images, str) else images
    tiling = (meta.get("tiling") or {}).get("images", [])
    per_image = [i.get("tiles", 0) for i in tiling]
    size = ((meta.get("tiling") or {}).get("params") or {}).get("image_size", 448)
    image_ok = (len(images) == ph["image"]
                and (len(per_image) == len(images) and sum(per_image) == len(tiles)
                     if tiles or per_image else
                     len([n for n in names if n.startswith("image_")]) == len(images)))
    video = meta.get("video") or {}
    video_ok = (ph["video"] == (1 if rec.get("video") else 0)
                and (len(frames) == video.get("frames", 0) if frames or video else True))
    audio_ok = len(audio) == len(rec.get("audio") or []) == ph["audio"]
    row["members_ok"] = bool(image_ok and video_ok and audio_ok)
    if per_image:
        row["tiles_min"], row["tiles_max"] = min(per_image), max(per_image)
    for n in tiles + frames:
        try:
            ok = Image.open(io.BytesIO(members[n])).size == (size, size)
        except Exception:  # noqa: BLE001 - an undecodable tile is a failing sample, not a crash
            ok = False
        row["sizes_ok"] = row["sizes_ok"] and ok
    if frames:
        row["frames"] = len(frames)
        dur = video.get("duration_s") or 0
        row["frames_rule_ok"] = dur > 0 and len(frames) == len(sample_times(dur))
    if audio:
        want = pair_sr if meta.get("task") == "tts_pair" else speech_sr
        try:
            stats = [_rms_dbfs(members[n]) for n in audio]
        except Exception:  # noqa: BLE001 - undecodable audio fails the rate check
            stats = [(0, 0.0, -200.0)]
        row["audio_rate_ok"] = all(sr == want for sr, _, _ in stats)
        row["audio_min_s"] = min(d for _, d, _ in stats)
        row["audio_max_s"] = max(d for _, d, _ in stats)
        row["audio_min_dbfs"] = min(db for _, _, db in stats)
    sp = meta.get("speech") or {}
    row["spoken"], row["typed"] = int(sp.get("spoken", 0)), int(sp.get("typed", 0))
    return row


class ShardScanner:
    """Executor work: one shard -> its sample rows and its shard row."""

    def __init__(self, speech_sr: int, pair_sr: int) -> None:
        self.speech_sr, self.pair_sr = speech_sr, pair_sr

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        tar, m = payload["tar"], payload["manifest"]
        name = m["shard"]
        shard = {"shard": name, "sha256_ok": False, "size_ok": False, "count_ok": False,
                 "members_match_manifest": False}
        if not uri.exists(tar):
            return {"rows": [], "shard": shard}
        size, sha = sha256_of(tar)
        shard["sha256_ok"], shard["size_ok"] = sha == m["sha256"], size == m["bytes"]
        rows: list[dict[str, Any]] = []
        found: list[tuple[str, list[str]]] = []
        try:
            for key, members in iter_samples(tar):
                found.append((key, sorted(members)))
                rows.append(sample_row(name, key, members, self.speech_sr, self.pair_sr))
        except Exception as err:  # a tar that does not even parse: every check on it fails
            rows.append({"shard": name, "key": f"<unreadable: {type(err).__name__}>",
                         "has_json": False, "id": f"{name}#unreadable", "members_ok": False,
                         "sizes_ok": False, "turns_ok": False})
            found.append(("", []))
        shard["count_ok"] = len(rows) == m["count"]
        # The tar holds exactly the samples and members its manifest lists (a member lost
        # after the write is the shard's damage, not the sample's fault).
        listed = [(e["key"], sorted(e["members"])) for e in m.get("samples", [])]
        shard["members_match_manifest"] = found == listed
        return {"rows": rows, "shard": shard, "sha256": sha}


def manifests(folder: str) -> Iterator[dict[str, Any]]:
    """The stage's manifests, one at a time (a big stage has thousands)."""
    for n in sorted(uri.listdir(folder)):
        if n.endswith(".manifest.json"):
            yield json.loads(uri.read_bytes(uri.join(folder, n)))
