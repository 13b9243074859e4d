"""A built stage in VITA-1.5's own training layout (or LLaVA's), for their training scripts.

VITA's loader (vita/util/data_utils_video_audio*.py) reads a JSON list of records per
dataset, opens an image or video at FolderDict[record["set"]] / path and an audio file at
AudioFolder / "audio" / path. So `--format vita` writes:

    DEST/chat/<source>.json        the records of each source, VITA's fields only
    DEST/meta/<source>.meta.jsonl  our `meta` of each record (id, set, meta), same order
    DEST/audio/                    the one media folder: every set's FolderDict entry points
        images/<set>/<key>_<i>.jpg     here, and it is AudioFolder/audio with AudioFolder=DEST
        videos/<set>/<key>.mp4
        speech/<set>/<key>_<i>.flac
    DEST/dataset_config.py         AudioFolder, FolderDict, one {chat_path, data_ratio} per
                                   source and the DataConfig entry, for vita/config/
    DEST/corpus.yaml               a config that re-ingests the export with our `vita` reader
    DEST/export.json               what was exported, from where, with which verdict (last)

Images are the tiles pasted back into their grid, cols*448 x rows*448 (the thumbnail left
out), so VITA's dynamic tiling (with `--image_aspect_ratio square`) picks the same grid;
video frames become a 1 fps H.264 mp4, so VITA's 1 fps sampling and our own rule both take
the same frames back; audio members are written as they are. `--format llava` writes one
LLaVA/ShareGPT4V JSON list with `images/` and `videos/` beside it; a spoken question goes back
to its text (LLaVA has no audio), and a sample whose audio is not a spoken question is
skipped with a reason.

The export is written to DEST.partial and renamed into place at the end, so an interrupted
export never looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from flows.export.llava import llava_record
from flows.export.media import MEDIA, ExportError, MediaFiles, NotExported, safe_name, write_file
from flows.export.vita import kind_of, reingest_config, vita_config, vita_record
from storage import uri
from storage.shards import iter_samples

FORMATS = ("vita", "llava")
_PH = re.compile(r"<(image|video|audio)>")


@dataclass
class ExportResult:
    dest: str
    format: str
    stage: str
    records: int = 0
    by_source: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    files: dict[str, str] = field(default_factory=dict)


def stage_dir(stage: str) -> str:
    return stage if stage.startswith("stage_") or stage == "ingest" else f"stage_{stage}"


# --- media ---------------------------------------------------------------------------------


# --- records -------------------------------------------------------------------------------


class _JsonList:
    """A JSON list written one record at a time (a stage may not fit in memory)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.n = 0

    def add(self, obj: Any) -> None:
        self.f.write(("[\n" if self.n == 0 else ",\n") + json.dumps(obj, ensure_ascii=False))
        self.n += 1

    def close(self) -> None:
        self.f.write("[]\n" if self.n == 0 else "\n]\n")
        self.f.close()


# --- the export ----------------------------------------------------------------------------

def _saved_config(out: str) -> dict[str, Any]:
    import yaml

    path = uri.join(out, "corpus.yaml")
    return (yaml.safe_load(uri.read_bytes(path)) or {}) if uri.exists(path) else {}


def _prepare_dest(dest: str) -> str:
    """DEST must be new or an earlier export; the work goes to DEST.partial."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and os.listdir(dest) and not os.path.exists(
            os.path.join(dest, "export.json")):
        raise ExportError(f"{dest} exists and is not an earlier export (no export.json): "
                          "choose an empty or new folder")
    partial = f"{dest}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    os.makedirs(partial)
    return partial


def _commit(partial: str, dest: str) -> None:
    old = f"{dest}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(partial, dest)
    shutil.rmtree(old, ignore_errors=True)


def export_stage(out: str, stage: str, dest: str, fmt: str = "vita",
                 skip_validation: bool = False, fps: int = 1) -> ExportResult:
    """Export OUT's stage to DEST in `fmt`; refuse a stage without a passing verdict unless
    `skip_validation` (recorded in DEST/export.json)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {list(FORMATS)}")
    if not uri.is_local(dest):
        raise ExportError("DEST must be a local folder (VITA's loader opens local paths)")
    sdir = stage_dir(stage)
    folder = uri.join(out, sdir)
    if not uri.exists(folder):
        raise ExportError(f"no stage {stage!r} in {out}")
    verdict: dict[str, Any] | None = None
    if not skip_validation:
        from storage.verdict import ValidationRequired, require_verdict

        try:
            verdict = require_verdict(out, sdir)
        except ValidationRequired as err:
            raise ExportError(f"{err} (or pass --skip-validation to export it anyway)") from None
    dest = os.path.abspath(dest)
    partial = _prepare_dest(dest)
    res = ExportResult(dest=dest, format=fmt, stage=sdir)
    media = MediaFiles(partial, MEDIA if fmt == "vita" else "", fps)
    lists: dict[str, _JsonList] = {}
    metas: dict[str, IO[str]] = {}
    sets: dict[str, str] = {}  # set -> source
    kinds: dict[str, str] = {}
    skipped: IO[str] | None = None
    name = safe_name(f"{sdir}")
    try:
        for tar in sorted(n for n in uri.listdir(folder) if n.endswith(".tar")):
            for key, members in iter_samples(uri.join(folder, tar)):
                try:
                    if "json" not in members:
                        raise NotExported("sample_unreadable", f"{tar}: {key}")
                    rec = json.loads(members["json"])
                    meta = rec.get("meta") or {}
                    src = safe_name(str(meta.get("source") or rec.get("set") or "samples"))
                    made = (vita_record if fmt == "vita" else llava_record)(rec, members, media, key)
                except NotExported as skip:
                    res.skipped[skip.reason] += 1
                    if skipped is None:
                        skipped = open(os.path.join(partial, "skipped.jsonl"), "w",  # noqa: SIM115
                                       encoding="utf-8")
                    skipped.write(json.dumps({"shard": tar, "key": key, "reason": skip.reason,
                                              "detail": skip.detail}) + "\n")
                    continue
                list_key = src if fmt == "vita" else name
                if list_key not in lists:
                    if fmt == "vita":
                        chat = os.path.join(partial, "chat", f"{list_key}.json")
                        meta_path = os.path.join(partial, "meta", f"{list_key}.meta.jsonl")
                    else:
                        chat = os.path.join(partial, f"{name}.json")
                        meta_path = os.path.join(partial, f"{name}.meta.jsonl")
                    os.makedirs(os.path.dirname(meta_path), exist_ok=True)
                    lists[list_key] = _JsonList(chat)
                    metas[list_key] = open(meta_path, "w", encoding="utf-8")  # noqa: SIM115
                lists[list_key].add(made)
                metas[list_key].write(json.dumps({"id": rec["id"], "set": rec.get("set"),
                                                  "key": key, "meta": meta},
                                                 ensure_ascii=False) + "\n")
                for s in made["set"] if isinstance(made.get("set"), list) else [made.get("set")]:
                    if s is not None:
                        sets.setdefault(str(s), src)
                kinds.setdefault(src, kind_of(meta))
                res.records += 1
                res.by_source[src] += 1
    finally:
        for jl in lists.values():
            jl.close()
        for f in metas.values():
            f.close()
        if skipped is not None:
            skipped.close()
    cfg = _saved_config(out)
    if fmt == "vita":
        write_file(partial, "dataset_config.py",
               vita_config(dest, sdir, cfg.get("name", "corpus"), sorted(lists), sets).encode())
        write_file(partial, "corpus.yaml", reingest_config(cfg, sdir, kinds, list(lists)).encode())
    summary = {
        "format": fmt, "stage": sdir, "from": os.path.abspath(out) if uri.is_local(out) else out,
        "corpus": cfg.get("name"), "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "records": res.records, "by_source": dict(sorted(res.by_source.items())),
        "skipped": dict(res.skipped), "fps": fps,
        "validation": ("skipped (--skip-validation)" if skip_validation else
                       {"passed": True, "validated_at": (verdict or {}).get("validated_at")}),
        "layout": ({"chat": "chat/<source>.json", "meta": "meta/<source>.meta.jsonl",
                    "AudioFolder": dest, "set_folder": os.path.join(dest, MEDIA),
                    "config": "dataset_config.py", "reingest": "corpus.yaml"} if fmt == "vita" else
                   {"data_path": f"{name}.json", "image_folder": dest,
                    "meta": f"{name}.meta.jsonl"}),
    }
    write_file(partial, "export.json", (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())
    _commit(partial, dest)
    res.files = {k: os.path.join(dest, v) for k, v in summary["layout"].items()
                 if isinstance(v, str) and not os.path.isabs(v)}
    return res


# --- the check -----------------------------------------------------------------------------
