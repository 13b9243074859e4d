"""One record's media through the transforms: tiles, frames, audio; members and meta.

Member names follow the shard layout: `tile_00.jpg ...` (all images' tiles in placeholder
order, each image's thumbnail after its grid), `frame_00.jpg ...`, `audio_00.flac ...`.
`meta.tiling`, `meta.video` and `meta.audio_info` say which members belong to which medium and
with which parameters; `meta.tokens` estimates the sequence length per modality.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from schemas.params import LimitsConfig, TransformSettings
from schemas.record import Record
from schemas.text import estimate_text_tokens
from transforms.audio import encode_flac, load_audio
from transforms.media import passthrough_members
from transforms.tiling import tile_image
from transforms.video import TOKENS_PER_FRAME, VideoBudget, encode_frames, sample_frames

Member = tuple[str, bytes]


def prepare_members(record: Record, fetch: Callable[..., bytes], settings: TransformSettings,
                    max_image_pixels: int, limits: LimitsConfig | None = None
                    ) -> tuple[list[Member], dict[str, Any]]:
    """Members and meta for `record`; raises Rejected when a medium is unusable or would cost
    more than `limits` to decode. `fetch(path, kind)` reads a medium of kind image, video or
    audio."""
    limits = limits or LimitsConfig()
    image_budget = limits.decoded_bytes("image")
    if not settings.enabled:
        members, meta = passthrough_members(record, fetch, max_image_pixels, image_budget)
        meta["tokens"] = {"text": estimate_text_tokens(record.text())}
        return members, meta
    media = record.media()
    members: list[Member] = []
    names: dict[str, list[str]] = {}
    meta: dict[str, Any] = {}
    tokens = {"image": 0, "video": 0, "audio": 0, "text": estimate_text_tokens(record.text())}

    tiling = []
    for path in media["image"]:
        tiled = tile_image(fetch(path, "image"), settings.tiling, max_image_pixels, image_budget)
        first = sum(1 for s, _ in members if s.startswith("tile_"))
        for i, data in enumerate(tiled.tiles):
            name = f"tile_{first + i:02d}.jpg"
            members.append((name, data))
            names.setdefault("image", []).append(name)
        tiling.append({**tiled.meta(), "first_tile": first})
        tokens["image"] += tiled.tokens
    if tiling:
        meta["tiling"] = {"images": tiling, "params": asdict(settings.tiling)}

    for path in media["video"]:
        frames = sample_frames(fetch(path, "video"), settings.video, VideoBudget(
            limits.video_max_frames, limits.video_max_s, image_budget))
        first = sum(1 for s, _ in members if s.startswith("frame_"))
        for i, data in enumerate(encode_frames(frames, settings.video.jpeg_quality)):
            name = f"frame_{first + i:02d}.jpg"
            members.append((name, data))
            names.setdefault("video", []).append(name)
        meta["video"] = {**frames.meta(), "params": asdict(settings.video)}
        tokens["video"] += len(frames.frames) * TOKENS_PER_FRAME

    infos = []
    for i, path in enumerate(media["audio"]):
        audio = load_audio(fetch(path, "audio"), settings.audio, limits.decoded_bytes("audio"))
        name = f"audio_{i:02d}.flac"
        members.append((name, encode_flac(audio)))
        names.setdefault("audio", []).append(name)
        infos.append(audio.meta())
        tokens["audio"] += audio.tokens
    if infos:
        meta["audio_info"] = infos

    meta["members"] = names
    meta["tokens"] = {**tokens, "total": sum(tokens.values())}
    return members, meta
