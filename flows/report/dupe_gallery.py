"""The Duplicates section's gallery: a few near-duplicate pairs (text and image) shown side by
side, the kept sample beside the other, so a person can judge the threshold by eye.

The pairs come from the build report's `dedupe` entry: its largest clusters per kind (the
content index's) and, when images are only reported, the pHash report's examples. A kept sample
is read from its ingest shard (tiles shown as the trainer sees them); a rejected one from the
reject store's raw input, its images read from the source's media root (OUT/corpus.yaml). Only
the few manifests, shards and reject files that hold them are opened.
"""

from __future__ import annotations

import html
import json
from typing import Any

from flows.report.gallery import IMAGE_PX, MediaWriter, Shown, _thumb, render_sample, show
from storage import uri
from storage.parts import REJECTS_DIR, iter_manifests
from storage.shards import iter_samples

STAGE = "duplicates"  # under report/media/
TEXT_KINDS = ("near_duplicate",)
IMAGE_KINDS = ("near_duplicate_image",)


def pairs_to_show(d: dict[str, Any], per_kind: int = 3) -> list[dict[str, Any]]:
    """(kind, kept, other, score) of a few near-duplicate pairs, text first, then images."""
    out: list[dict[str, Any]] = []
    for kinds in (TEXT_KINDS, IMAGE_KINDS):
        got = [{"kind": c["kind"], "kept": c["kept"], "other": m, "score": m["score"],
                "action": m["action"]}
               for c in d.get("clusters") or [] if c["kind"] in kinds for m in c["members"][:1]]
        out += got[:per_kind]
    ni = d.get("near_image") or {}
    if not any(p["kind"] in IMAGE_KINDS for p in out):
        out += [{"kind": "near_image", "kept": x["kept"], "other": x["other"],
                 "score": x["distance"], "action": "report"}
                for x in (ni.get("examples") or [])[:per_kind]]
    return out


def _media_roots(out: str) -> dict[str, str]:
    """Each source's media root, from the config OUT was built with (OUT/corpus.yaml)."""
    import yaml

    from schemas.config import ConfigError, config_from_dict
    from storage.readers import default_media_root

    path = uri.join(out, "corpus.yaml")
    if not uri.exists(path):
        return {}
    try:
        cfg = config_from_dict(yaml.safe_load(uri.read_bytes(path)), check_paths=False)
    except (yaml.YAMLError, ConfigError):
        return {}
    return {s.name: default_media_root(s) for s in cfg.sources}


def _from_reject(out: str, raw: str, source: str, key: str, media: MediaWriter,
                 roots: dict[str, str]) -> Shown:
    """A rejected input as the gallery renders it: its turns and its images (thumbnails)."""
    from storage.media import fetcher

    try:
        rec = json.loads(raw)
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return Shown(key=key, id=key, meta={"source": source}, turns=[("input", raw[:2000])])
    turns = [(str(t.get("from", "")), str(t.get("value", ""))) for t in rec["conversations"]
             if isinstance(t, dict)]
    sh = Shown(key=key, id=str(rec.get("id", key)), meta={"source": source, "task": "rejected"},
               turns=turns)
    images = rec.get("image") or []
    fetch = fetcher(roots[source]) if source in roots else None
    for i, path in enumerate([images] if isinstance(images, str) else images):
        try:
            assert fetch is not None
            data = _thumb(fetch(str(path), "image"), IMAGE_PX)
        except Exception:  # noqa: BLE001 - a picture we cannot show is left out, not fatal
            continue
        src = media.put(STAGE, key, f"image_{i:02d}.jpg", data)
        sh.images.append({"grid": None, "tiles": [src], "thumbnail": None, "source_size": None})
    return sh


def _find(out: str, source: str, sid: str, index: int | None, media: MediaWriter,
          roots: dict[str, str]) -> Shown | None:
    """Sample `sid` (input `index`) of `source`: from its ingest shard, else from the reject
    store."""
    for m in iter_manifests(out, "ingest", source):
        hit = next((s for s in m.samples if s.id == sid), None)
        if hit is not None and m.shard:
            for key, members in iter_samples(uri.join(out, "ingest", m.shard)):
                if key == hit.key and "json" in members:
                    return show(STAGE, key, members, media)
        if index is not None and m.input_start <= index < m.input_end and m.rejects_file:
            path = uri.join(out, REJECTS_DIR, m.rejects_file)
            if uri.exists(path):
                for line in uri.read_bytes(path).decode().splitlines():
                    r = json.loads(line)
                    if r.get("index") == index:
                        return _from_reject(out, r.get("raw") or "", source,
                                            f"{source}-rejected-{index}", media, roots)
    return None


def collect_pairs(out: str, d: dict[str, Any] | None, media: MediaWriter
                  ) -> list[tuple[dict[str, Any], Shown, Shown]]:
    if not d:
        return []
    roots = _media_roots(out)
    shown = []
    for p in pairs_to_show(d):
        k, o = p["kept"], p["other"]
        left = _find(out, k["source"], k["id"], k.get("index"), media, roots)
        right = _find(out, o["source"], o["id"], o.get("index"), media, roots)
        if left is not None and right is not None:
            shown.append((p, left, right))
    return shown


def render_pairs(pairs: list[tuple[dict[str, Any], Shown, Shown]]) -> str:
    if not pairs:
        return ""
    e = html.escape
    out = ["<h4>Near-duplicates side by side (kept on the left)</h4>"]
    for p, left, right in pairs:
        score = (f"Jaccard {p['score']:.2f}" if p["kind"] in TEXT_KINDS
                 else f"pHash {int(p['score'])} bits apart")
        out.append(f"<div class='dpair' data-kind='{e(p['kind'])}'><p class='sub'>"
                   f"{e(p['kind'])}: {e(p['kept']['source'])}/{e(p['kept']['id'])} kept, "
                   f"{e(p['other']['source'])}/{e(p['other']['id'])} {e(p['action'])}ed "
                   f"({score})</p><div class='gallery'>{render_sample(left)}"
                   f"{render_sample(right)}</div></div>")
    return "\n".join(out)
