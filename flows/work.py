"""The per-input work an executor runs: fetch media, transform, serialise the sample.

It runs wherever the executor puts it (in-process, or a Ray worker), so it takes and returns
plain dicts that pickle and convert to Arrow cleanly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from schemas.params import TransformSettings
from schemas.record import Record
from schemas.rejects import Rejected
from storage.media import fetcher
from transforms.record import prepare_members


@dataclass(frozen=True)
class WorkContext:
    settings: TransformSettings
    max_image_pixels: int
    media_roots: tuple[tuple[str, str], ...]  # (source name, media root URI)

    def root(self, source: str) -> str:
        return dict(self.media_roots)[source]


def rejected(err: Rejected) -> dict[str, Any]:
    return {"ok": False, "reason": err.reason, "detail": err.detail,
            "suffixes": [], "payloads": []}


def process_payload(ctx: WorkContext, payload: dict[str, Any]) -> dict[str, Any]:
    """{"source", "record": JSON} -> {"ok", "suffixes", "payloads"} or {"ok": False, "reason"}.

    Expected drops come back as data; anything unexpected raises and the executor reports it.
    """
    if payload.get("error"):  # decided by the driver (a parse error, a duplicate id)
        return {"ok": False, "reason": payload["error"][0], "detail": payload["error"][1],
                "suffixes": [], "payloads": []}
    rec = Record.model_validate_json(payload["record"])
    try:
        members, meta = prepare_members(rec, fetcher(ctx.root(payload["source"])), ctx.settings,
                                        ctx.max_image_pixels)
        for k, v in meta.items():
            setattr(rec.meta, k, v)
        try:
            js = json.dumps(rec.to_json(), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise Rejected("invalid_utf8", f"a string holds an unpaired surrogate: {err}") from None
    except Rejected as err:
        return rejected(err)
    return {"ok": True, "reason": "", "detail": "",
            "suffixes": ["json", *(s for s, _ in members)],
            "payloads": [js, *(d for _, d in members)]}
