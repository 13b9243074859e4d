"""One record's media through the transforms: tiles, frames, audio; members and meta.

Member names follow the shard layout: `tile_00.jpg ...` (all images' tiles in placeholder
order, each image's thumbnail after its grid), `frame_00.jpg ...`, `audio_00.flac ...`.
`meta.tiling`, `meta.video` and `meta.audio_info` say which members belong to which medium and
with which parameters; `meta.tokens` estimates the sequence length per modality.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

from schemas.params import LimitsConfig, TransformSettings
from schemas.record import Record
from schemas.text import estimate_text_tokens
from transforms.audio import encode_flac, load_audio
from transforms.media import passthrough_members
from transforms.tiling import TOKENS_PER_TILE, tile_image
from transforms.video import TOKENS_PER_FRAME, VideoBudget, encode_frames, sample_frames

Member = tuple[str, bytes]


class Cache(Protocol):
    """Transformed media by entry key (storage.media_cache.MediaCache)."""

    def get(self, key: str) -> tuple[list[bytes], dict[str, Any]] | None: ...

    def put(self, key: str, blobs: list[bytes], meta: dict[str, Any]) -> None: ...


def _hashing(fetch: Callable[..., bytes], hashes: dict[str, list[str]]) -> Callable[..., bytes]:
    """`fetch` that records each medium's sha256, by kind, in the order they are read."""

    def wrapped(path: str, kind: str = "image") -> bytes:
        data = fetch(path, kind)
        hashes.setdefault(kind, []).append(hashlib.sha256(data).hexdigest())
        return data

    return wrapped


def _through_cache(kind: str, path: str, known_sha: str | None, params: dict[str, Any],
                   fetch: Callable[..., bytes], cache: Cache | None,
                   hashes: dict[str, list[str]],
                   make: Callable[[bytes, str], tuple[list[bytes], dict[str, Any]]]
                   ) -> tuple[list[bytes], dict[str, Any]]:
    """One medium's transformed blobs and meta, `make(data, sha256)` on a miss, from the cache
    when an entry for its bytes and these parameters exists; its sha256 goes into `hashes`.
    With `known_sha` (hashed by the planner) a hit does not read the file at all. A medium
    that `make` rejects leaves no entry (it is decoded, and rejected, again next time)."""

    def key(sha: str) -> str:
        from storage.media_cache import entry_key

        return entry_key(sha, kind, params)

    if cache is not None and known_sha is not None:
        got = cache.get(key(known_sha))
        if got is not None:
            hashes.setdefault(kind, []).append(known_sha)
            return got
    data = fetch(path, kind)
    sha = hashlib.sha256(data).hexdigest()
    hashes.setdefault(kind, []).append(sha)
    if cache is not None and sha != known_sha:
        got = cache.get(key(sha))
        if got is not None:
            return got
    blobs, meta = make(data, sha)
    if cache is not None:
        cache.put(key(sha), blobs, meta)
    return blobs, meta


def _tile(path: str, known_sha: str | None, fetch: Callable[..., bytes],
          settings: TransformSettings, max_image_pixels: int, image_budget: int,
          cache: Cache | None, phash: bool, hashes: dict[str, list[str]]
          ) -> tuple[list[bytes], dict[str, Any]]:
    """One image's tiles and meta (with its sha256 and pHash), through the cache."""
    params = {**asdict(settings.tiling), "max_pixels": max_image_pixels,
              "max_decoded": image_budget, "phash": phash}

    def make(data: bytes, sha: str) -> tuple[list[bytes], dict[str, Any]]:
        tiled = tile_image(data, settings.tiling, max_image_pixels, image_budget)
        meta: dict[str, Any] = {**tiled.meta(), "sha256": sha}
        if phash:
            from transforms.dedupe import phash as perceptual

            meta["phash"] = perceptual(data)
        return tiled.tiles, meta

    return _through_cache("image", path, known_sha, params, fetch, cache, hashes, make)


def _frames(path: str, known_sha: str | None, fetch: Callable[..., bytes],
            settings: TransformSettings, budget: VideoBudget, cache: Cache | None,
            hashes: dict[str, list[str]]) -> tuple[list[bytes], dict[str, Any]]:
    """One video's sampled frames (JPEG) and their meta, through the cache: a clip that many
    records share is decoded once."""
    params = {**asdict(settings.video), **asdict(budget)}

    def make(data: bytes, _sha: str) -> tuple[list[bytes], dict[str, Any]]:
        frames = sample_frames(data, settings.video, budget)
        return (encode_frames(frames, settings.video.jpeg_quality),
                {**frames.meta(), "params": asdict(settings.video)})

    return _through_cache("video", path, known_sha, params, fetch, cache, hashes, make)


def _audio(path: str, known_sha: str | None, fetch: Callable[..., bytes],
           settings: TransformSettings, budget: int, cache: Cache | None,
           hashes: dict[str, list[str]]) -> tuple[list[bytes], dict[str, Any]]:
    """One clip's FLAC at the target rate, its meta and its tokens, through the cache."""
    params = {**asdict(settings.audio), "max_decoded": budget}

    def make(data: bytes, _sha: str) -> tuple[list[bytes], dict[str, Any]]:
        audio = load_audio(data, settings.audio, budget)
        return [encode_flac(audio)], {"info": audio.meta(), "tokens": audio.tokens}

    return _through_cache("audio", path, known_sha, params, fetch, cache, hashes, make)


def prepare_members(record: Record, fetch: Callable[..., bytes], settings: TransformSettings,
                    max_image_pixels: int, limits: LimitsConfig | None = None,
                    cache: Cache | None = None, media_sha256: dict[str, list[str]] | None = None,
                    phash: bool = False) -> tuple[list[Member], dict[str, Any]]:
    """Members and meta for `record`; raises Rejected when a medium is unusable or would cost
    more than `limits` to decode. `fetch(path, kind)` reads a medium of kind image, video or
    audio. `cache` holds transformed media (an image's tiles, a video's sampled frames, a
    clip's resampled FLAC) by (content hash, parameters); `media_sha256`, the
    media's hashes when the planner has them; `phash` adds each image's perceptual hash.
    `meta.media_sha256` gets every medium's content hash, by kind, in placeholder order."""
    limits = limits or LimitsConfig()
    image_budget = limits.decoded_bytes("image")
    hashes: dict[str, list[str]] = {}
    if not settings.enabled:  # media kept as they are: hashed as they are read
        members, meta = passthrough_members(record, _hashing(fetch, hashes), max_image_pixels,
                                            image_budget)
        meta["tokens"] = {"text": estimate_text_tokens(record.text())}
        meta["media_sha256"] = hashes
        return members, meta
    known = (media_sha256 or {}).get("image", [])
    media = record.media()
    members: list[Member] = []
    names: dict[str, list[str]] = {}
    meta: dict[str, Any] = {}
    tokens = {"image": 0, "video": 0, "audio": 0, "text": estimate_text_tokens(record.text())}

    tiling = []
    for j, path in enumerate(media["image"]):
        tiles, tmeta = _tile(path, known[j] if j < len(known) else None, fetch, settings,
                             max_image_pixels, image_budget, cache, phash, hashes)
        first = sum(1 for s, _ in members if s.startswith("tile_"))
        for i, data in enumerate(tiles):
            name = f"tile_{first + i:02d}.jpg"
            members.append((name, data))
            names.setdefault("image", []).append(name)
        tiling.append({**tmeta, "first_tile": first})
        tokens["image"] += len(tiles) * TOKENS_PER_TILE
    if tiling:
        meta["tiling"] = {"images": tiling, "params": asdict(settings.tiling)}

    known_video = (media_sha256 or {}).get("video", [])
    budget = VideoBudget(limits.video_max_frames, limits.video_max_s, image_budget)
    for j, path in enumerate(media["video"]):
        blobs, vmeta = _frames(path, known_video[j] if j < len(known_video) else None,
                               fetch, settings, budget, cache, hashes)
        first = sum(1 for s, _ in members if s.startswith("frame_"))
        for i, data in enumerate(blobs):
            name = f"frame_{first + i:02d}.jpg"
            members.append((name, data))
            names.setdefault("video", []).append(name)
        meta["video"] = vmeta
        tokens["video"] += len(blobs) * TOKENS_PER_FRAME

    known_audio = (media_sha256 or {}).get("audio", [])
    infos = []
    for i, path in enumerate(media["audio"]):
        blobs, ameta = _audio(path, known_audio[i] if i < len(known_audio) else None,
                              fetch, settings, limits.decoded_bytes("audio"), cache, hashes)
        name = f"audio_{i:02d}.flac"
        members.append((name, blobs[0]))
        names.setdefault("audio", []).append(name)
        infos.append(ameta["info"])
        tokens["audio"] += ameta["tokens"]
    if infos:
        meta["audio_info"] = infos

    meta["members"] = names
    meta["media_sha256"] = hashes
    meta["tokens"] = {**tokens, "total": sum(tokens.values())}
    return members, meta
