"""The report's sample gallery: a few seeded samples per stage, shown as a trainer sees them.

Samples are chosen while the report streams the stage's manifests, by a seeded hash of
(seed, stage, key): the best-ranked of each kind first (image with speech, video, speech,
image, text) so that a stage's media all show up, then the best-ranked rest; a rebuild with
the same seed shows the same samples. Only the chosen samples' shards are opened. Media are
written beside the report as small files (tiles and frames shrunk to thumbnails, audio members
copied as they are) under OUT/report/media/<stage>/<key>/, so the report folder is
self-contained.
"""

from __future__ import annotations

import heapq
import html
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from storage import uri
from storage.shards import iter_samples

TILE_PX = 112
FRAME_PX = 150
IMAGE_PX = 336
MAX_VIDEO_BYTES = 8 * 2**20
_PH = re.compile(r"<(image|video|audio)>")
# Which kinds of sample the gallery shows first: the ones whose media are easy to miss.
_PRIORITY = ("image+audio", "video", "audio", "image", "text")


@dataclass(frozen=True)
class Pick:
    shard: str
    key: str
    id: str
    kind: str
    rank: int


@dataclass
class Shown:
    """One sample as the gallery renders it."""

    key: str
    id: str
    meta: dict[str, Any]
    turns: list[tuple[str, str]]
    images: list[dict[str, Any]] = field(default_factory=list)  # per image: grid, tiles, thumb
    video: dict[str, Any] | None = None
    audio: list[dict[str, Any]] = field(default_factory=list)  # per audio: src, caption


def kind_of(s: dict[str, Any]) -> str:
    """The kind of a manifest's sample entry, as the report's modality figures count them."""
    if s.get("frames"):
        return "video"
    if s.get("tiles"):
        return "image+audio" if s.get("audio_s") else "image"
    return "audio" if s.get("audio_s") else "text"


def rank(seed: int, stage: str, key: str) -> int:
    """A sample's place in the gallery order: a seeded hash (crc32: cheap on millions of rows)."""
    return zlib.crc32(f"{seed}|gallery|{stage}|{key}".encode())


class Picker:
    """Offered every sample of a stage while the report streams its manifests; keeps the
    best-ranked sample of each kind and the k best-ranked overall."""

    def __init__(self, seed: int, stage: str, k: int) -> None:
        self.seed, self.stage, self.k = seed, stage, k
        self._crc = zlib.crc32(f"{seed}|gallery|{stage}|".encode())  # rank() of the prefix
        self.best: dict[str, Pick] = {}
        self.top: list[tuple[int, str, Pick]] = []  # a max-heap by rank, as negated ranks
        self._cut = 1 << 33  # the worst rank in `top` once it is full: above it nothing enters

    def offer(self, shard: str, s: dict[str, Any], kind: str | None = None) -> None:
        """`kind`: the sample's kind_of, when the caller has it already."""
        # Called once per sample of the build: most return on the first test, and objects are
        # made only for the few that win.
        if self.k <= 0:
            return
        key = s["key"]
        r = zlib.crc32(key.encode(), self._crc)
        kind = kind or kind_of(s)
        b = self.best.get(kind)
        if r > self._cut and b is not None and (r, key) >= (b.rank, b.key):
            return
        p = Pick(shard, key, s["id"], kind, r)
        if b is None or (r, key) < (b.rank, b.key):
            self.best[kind] = p
        if len(self.top) < self.k:
            heapq.heappush(self.top, (-r, key, p))
        elif (-r, key) > self.top[0][:2]:
            heapq.heapreplace(self.top, (-r, key, p))
        if len(self.top) >= self.k:
            self._cut = -self.top[0][0]

    def picks(self) -> list[Pick]:
        chosen = [self.best[k] for k in _PRIORITY if k in self.best][: self.k]
        for _, _, p in sorted(self.top, reverse=True):
            if len(chosen) >= self.k:
                break
            if p not in chosen:
                chosen.append(p)
        return sorted(chosen, key=lambda p: (p.rank, p.key))


def _thumb(data: bytes, px: int) -> bytes:
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _by_prefix(members: dict[str, bytes], prefix: str) -> list[str]:
    return sorted(n for n in members if n.startswith(prefix))


class MediaWriter:
    """Writes a stage's gallery media under report/media and remembers what it wrote."""

    def __init__(self, report_dir: str) -> None:
        self.report_dir = report_dir
        self.written: set[str] = set()

    def put(self, stage: str, key: str, name: str, data: bytes) -> str:
        rel = f"media/{stage}/{key}/{name}"
        uri.write_bytes_atomic(uri.join(self.report_dir, rel), data)
        self.written.add(rel)
        return rel

    def prune(self) -> None:
        """Remove media of samples no longer shown (local reports only)."""
        root = os.path.join(self.report_dir, "media")
        if not uri.is_local(root) or not os.path.isdir(root):
            return
        for dirpath, _, files in os.walk(root, topdown=False):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), self.report_dir).replace(os.sep, "/")
                if rel not in self.written:
                    os.remove(os.path.join(dirpath, f))
            if dirpath != root and not os.listdir(dirpath):
                os.rmdir(dirpath)


def _audio_captions(rec: dict[str, Any], names: list[str]) -> list[str]:
    meta = rec.get("meta") or {}
    spoken = {q.get("member"): q for q in (meta.get("speech") or {}).get("questions", [])}
    infos = meta.get("audio_info") or []
    target = meta.get("speech_target") or {}
    caps = []
    for i, name in enumerate(names):
        if name in spoken:
            q = spoken[name]
            caps.append(f"spoken question: \u201c{q.get('text', '')}\u201d "
                        f"({q.get('voice', '?')}, {q.get('duration_s', 0):.2f} s)")
        elif target:
            caps.append(f"target speech for \u201c{target.get('text', '')}\u201d "
                        f"({target.get('voice', '?')}, {target.get('sample_rate', '?')} Hz, "
                        f"{target.get('duration_s', 0):.2f} s)")
        elif i < len(infos):
            caps.append(f"speech input, {infos[i].get('duration_s', 0):.2f} s at "
                        f"{infos[i].get('sample_rate', '?')} Hz")
        else:
            caps.append("audio")
    return caps


def show(stage: str, key: str, members: dict[str, bytes], media: MediaWriter) -> Shown:
    """Write one sample's media and describe it for rendering."""
    rec = json.loads(members["json"])
    meta = rec.get("meta") or {}
    listed = meta.get("members") or {}
    sh = Shown(key=key, id=str(rec.get("id", key)), meta=meta,
               turns=[(str(t.get("from", "")), str(t.get("value", "")))
                      for t in rec.get("conversations") or []])
    image_members = listed.get("image") or _by_prefix(members, "tile_") or _by_prefix(members, "image_")
    tiling = (meta.get("tiling") or {}).get("images") or []
    if tiling:
        for im in tiling:
            cols, rows = im.get("grid", [1, 1])
            first, n = im.get("first_tile", 0), im.get("tiles", cols * rows)
            names = image_members[first:first + n]
            grid = [media.put(stage, key, nm, _thumb(members[nm], TILE_PX)) for nm in names[:cols * rows]]
            thumb = (media.put(stage, key, names[cols * rows], _thumb(members[names[cols * rows]], TILE_PX))
                     if n > cols * rows else None)
            sh.images.append({"grid": (cols, rows), "tiles": grid, "thumbnail": thumb,
                              "source_size": im.get("source_size")})
    else:  # media passed through untransformed: the image itself
        for nm in image_members:
            src = media.put(stage, key, nm, _thumb(members[nm], IMAGE_PX))
            sh.images.append({"grid": None, "tiles": [src], "thumbnail": None, "source_size": None})
    frames = [n for n in (listed.get("video") or _by_prefix(members, "frame_")) if n in members]
    if frames and frames[0].startswith("frame_"):
        times = (meta.get("video") or {}).get("frame_times") or []
        sh.video = {"frames": [media.put(stage, key, n, _thumb(members[n], FRAME_PX)) for n in frames],
                    "times": times, "duration_s": (meta.get("video") or {}).get("duration_s")}
    elif frames and len(members[frames[0]]) <= MAX_VIDEO_BYTES:
        sh.video = {"clip": media.put(stage, key, frames[0], members[frames[0]])}
    audio = [n for n in (listed.get("audio") or _by_prefix(members, "audio_")) if n in members]
    for name, cap in zip(audio, _audio_captions(rec, audio), strict=True):
        sh.audio.append({"src": media.put(stage, key, name, members[name]), "caption": cap})
    return sh


def collect(out: str, stage: str, picks: list[Pick], media: MediaWriter) -> list[Shown]:
    """Read the picked samples (each of their shards streamed once, until its picks are found)."""
    wanted: dict[str, set[str]] = {}
    for p in picks:
        wanted.setdefault(p.shard, set()).add(p.key)
    found: dict[str, Shown] = {}
    for shard, keys in wanted.items():
        path = uri.join(out, stage, shard)
        if not uri.exists(path):
            continue
        for key, members in iter_samples(path):
            if key in keys and "json" in members:
                found[key] = show(stage, key, members, media)
                if keys <= set(found):
                    break
    return [found[p.key] for p in picks if p.key in found]


# --- HTML ----------------------------------------------------------------------------------

def _image_html(im: dict[str, Any]) -> str:
    e = html.escape
    if im["grid"] is None:
        return f'<figure class="media"><img src="{e(im["tiles"][0])}" alt="image"></figure>'
    cols, rows = im["grid"]
    tiles = "".join(f'<img class="tile" src="{e(t)}" alt="tile {i}" title="tile {i} (row {i // cols}, '
                    f'col {i % cols})">' for i, t in enumerate(im["tiles"]))
    thumb = (f'<div class="thumb"><img src="{e(im["thumbnail"])}" alt="thumbnail">'
             f'<span>thumbnail</span></div>' if im["thumbnail"] else "")
    size = im.get("source_size")
    src = f", source {size[0]}x{size[1]}" if size else ""
    return (f'<figure class="media tiles"><div class="tgrid" style="grid-template-columns:'
            f'repeat({cols},{TILE_PX}px)">{tiles}</div>{thumb}<figcaption>grid {cols}x{rows}, '
            f'{len(im["tiles"]) + bool(im["thumbnail"])} tiles{src}</figcaption></figure>')


def _video_html(v: dict[str, Any]) -> str:
    e = html.escape
    if "clip" in v:
        return (f'<figure class="media"><video controls preload="metadata" src="{e(v["clip"])}">'
                f'</video></figure>')
    times = v.get("times") or []
    frames = "".join(f'<div class="frame"><img src="{e(f)}" alt="frame {i}">'
                     f'<span>{f"{times[i]:.2f} s" if i < len(times) else i}</span></div>'
                     for i, f in enumerate(v["frames"]))
    dur = f" of {v['duration_s']:.2f} s" if v.get("duration_s") else ""
    return (f'<figure class="media frames"><div class="frow">{frames}</div><figcaption>'
            f'{len(v["frames"])} frames{dur}, in order</figcaption></figure>')


def _audio_html(a: dict[str, Any]) -> str:
    e = html.escape
    return (f'<figure class="media audio"><audio controls preload="metadata" src="{e(a["src"])}">'
            f'</audio><figcaption>{e(a["caption"])}</figcaption></figure>')


def render_sample(sh: Shown) -> str:
    e = html.escape
    counters = {"image": 0, "video": 0, "audio": 0}
    turns = []
    for role, value in sh.turns:
        parts, pos = [], 0
        for m in _PH.finditer(value):
            parts.append(e(value[pos:m.start()].strip("\n")))
            kind = m.group(1)
            i = counters[kind]
            counters[kind] += 1
            if kind == "image" and i < len(sh.images):
                parts.append(_image_html(sh.images[i]))
            elif kind == "video" and sh.video:
                parts.append(_video_html(sh.video))
            elif kind == "audio" and i < len(sh.audio):
                parts.append(_audio_html(sh.audio[i]))
            else:
                parts.append(f"<code>{e(m.group(0))}</code>")
            pos = m.end()
        parts.append(e(value[pos:].strip("\n")))
        turns.append(f'<div class="turn {e(role)}"><span class="role">{e(role)}</span>'
                     f'<div class="says">{"".join(p for p in parts if p)}</div></div>')
    meta = sh.meta
    tokens = (meta.get("tokens") or {}).get("total")
    head = " &middot; ".join(e(str(x)) for x in (meta.get("source"), meta.get("task"),
                                                  meta.get("language")) if x)
    return (f'<div class="sample" data-key="{e(sh.key)}"><div class="shead"><b>{e(sh.id)}</b> '
            f'{head}{f" &middot; {tokens:,} tokens" if tokens else ""}</div>{"".join(turns)}</div>')


def render_gallery(stage: str, shown: list[Shown], seed: int) -> str:
    if not shown:
        return "<p class='empty'>no samples</p>"
    return (f"<h3>Samples</h3><p class='sub'>{len(shown)} samples of {html.escape(stage)} chosen by "
            f"seed {seed} (one of each kind first)</p><div class='gallery'>"
            + "".join(render_sample(s) for s in shown) + "</div>")


CSS = """.gallery{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.sample{border:1px solid #ddd;border-radius:6px;padding:8px 10px;background:#fcfcfc;max-width:100%}
.shead{font-size:12px;color:#555;margin-bottom:6px}.turn{display:flex;gap:8px;margin:4px 0}
.role{font-size:11px;font-weight:bold;color:#fff;background:#3366cc;border-radius:3px;padding:1px 5px;
height:16px}.turn.gpt .role{background:#109618}.says{white-space:pre-wrap;font-size:13px}
figure.media{margin:4px 0}.tgrid{display:grid;gap:2px}.tgrid img,.frame img{display:block}
.thumb{display:inline-block;margin-top:4px;font-size:11px;color:#666}.thumb img{width:56px;height:56px;
vertical-align:middle;margin-right:4px}.frow{display:flex;flex-wrap:wrap;gap:3px}.frame span{display:block;
font-size:10px;color:#666;text-align:center}figcaption{font-size:11px;color:#666}audio{height:32px}"""
