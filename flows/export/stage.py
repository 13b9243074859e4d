"""Stages of a build exported in VITA-1.5's own training layout (or LLaVA's), for their training
scripts.

VITA's loader (vita/util/data_utils_video_audio_neg_patch.py) reads a JSON list of records per
dataset, opens an image or video at FolderDict[record["set"]] / path and an audio file at
AudioFolder / "audio" / path, with one AudioFolder for every dataset. So `--format vita` writes:

    DEST/chat/<stage>/<source>.json        the records of each source, VITA's fields only
    DEST/meta/<stage>/<source>.meta.jsonl  our `meta` of each record (id, set, meta), same order
    ROOT/audio/<xkey>/                     each stage's media, where every FolderDict entry
        images/<set>/<key>_<i>.jpg         points and AudioFolder/audio is (AudioFolder=ROOT;
        videos/<set>/<key>.mp4             ROOT is DEST unless --media-root names a folder
        speech/<set>/<key>_<i>.flac        that several exports share)
    DEST/dataset_config.py                 AudioFolder, FolderDict, NoPatchSets, one
                                           {chat_path, data_ratio} per source, DataConfig
    DEST/corpus.yaml                       a config that re-ingests the export with our reader
    DEST/export.json                       what was exported, from where, with which verdict

<xkey> (corpus, stage and a hash of OUT's path) starts every set key and media path of a stage,
so the configs of any number of exports sharing a media root merge into one VITA config.
Images are the tiles pasted back into their grid, so VITA's tiling picks the same grid; video
frames become an H.264 mp4 at 3 fps, which VITA's sampling (video_framerate=3) takes back one
for one. `--format llava` writes DEST/<stage>.json lists with DEST/media/<stage>/ beside them.

Each shard is a task for the executor (this process, or Ray workers: the media are written
where they belong, the records to a part file), and the driver merges the parts in shard order,
so every executor writes the same bytes. The export is written to DEST.partial and renamed into
place at the end, so an interrupted export never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from flows.export.llava import LLAVA_VERSIONS
from flows.export.media import MEDIA, ExportError, safe_name, write_file
from flows.export.shard import ShardResult, ShardTask, export_shard, shard_count
from flows.export.vita import VITA_FPS, ident, reingest_config, vita_config, vita_stride
from storage import uri

FORMATS = ("vita", "llava")
LLAVA_FPS = 1  # LLaVA-NeXT samples at --video_fps 1 by default: stride round(1 / 1) = 1
NO_SPEECH_TARGETS = ("VITA's public loader has no speech-target training: it reads every "
                     "<audio> as input audio, so a stage-3 pair would train the wrong thing")


class TaskExecutor(Protocol):
    def map_tasks(self, fn: Callable[[ShardTask], ShardResult], items: Iterable[tuple[Any, ShardTask]]
                  ) -> Iterator[tuple[Any, ShardResult]]: ...


class _InProcess:
    def map_tasks(self, fn: Callable[[ShardTask], ShardResult], items: Iterable[tuple[Any, ShardTask]]
                  ) -> Iterator[tuple[Any, ShardResult]]:
        for tag, task in items:
            yield tag, fn(task)


@dataclass
class ExportResult:
    dest: str
    format: str
    stage: str                     # the stages, comma-separated
    records: int = 0
    by_source: Counter[str] = field(default_factory=Counter)  # "<stage>/<source>" -> records
    skipped: Counter[str] = field(default_factory=Counter)
    adjusted: Counter[str] = field(default_factory=Counter)
    left_out: dict[str, str] = field(default_factory=dict)  # stage -> why (from --stage all)
    files: dict[str, str] = field(default_factory=dict)
    data_config: list[str] = field(default_factory=list)  # VITA --dataset_use keys


def stage_dir(stage: str) -> str:
    return stage if stage.startswith("stage_") or stage == "ingest" else f"stage_{stage}"


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


def _saved_config(out: str) -> dict[str, Any]:
    import yaml

    path = uri.join(out, "corpus.yaml")
    return (yaml.safe_load(uri.read_bytes(path)) or {}) if uri.exists(path) else {}


def _prepare_dest(dest: str) -> str:
    """DEST must be new or an earlier export; the work goes to DEST.partial."""
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


def _stages(out: str, stage: str | list[str], fmt: str) -> tuple[list[str], dict[str, str]]:
    """The stage folders to export, and those `all` leaves out with why."""
    names = [stage] if isinstance(stage, str) else list(stage)
    left_out: dict[str, str] = {}
    if names == ["all"]:
        found = sorted(n for n in uri.listdir(out) if n.startswith("stage_")
                       and uri.exists(uri.join(out, n, "_stage.json")))
        sdirs = [s for s in found if not (fmt == "vita" and s.startswith("stage_3"))]
        left_out = {s: NO_SPEECH_TARGETS for s in found if s not in sdirs}
    else:
        sdirs = list(dict.fromkeys(stage_dir(s) for s in names))
    for s in sdirs:
        if fmt == "vita" and s.startswith("stage_3"):
            raise ExportError(f"{s} cannot be exported as --format vita: {NO_SPEECH_TARGETS}. "
                              "Train stage 3 with `vita-corpus train`")
        if not uri.exists(uri.join(out, s)):
            raise ExportError(f"no stage {s.removeprefix('stage_')!r} in {out}")
    if not sdirs:
        raise ExportError(f"no stage of {out} to export")
    return sdirs, left_out


def export_stage(out: str, stage: str | list[str], dest: str, fmt: str = "vita",
                 skip_validation: bool = False, fps: int | None = None,
                 llava_version: str = "1.5", media_root: str | None = None,
                 executor: TaskExecutor | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Export OUT's stages (one, several, or "all") to DEST in `fmt`, one shard a task on
    `executor` (default: this process); refuse a stage without a passing verdict unless
    `skip_validation` (recorded in DEST/export.json). `progress(samples_done, samples_total)`
    is called as shards finish."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {list(FORMATS)}")
    if llava_version not in LLAVA_VERSIONS:
        raise ExportError(f"unknown --llava-version {llava_version!r}; use one of {list(LLAVA_VERSIONS)}")
    fps = fps or (VITA_FPS if fmt == "vita" else LLAVA_FPS)
    if fmt == "vita" and vita_stride(fps) != 1:
        raise ExportError(f"--fps {fps}: VITA samples videos at 3 fps (a stride of round(fps / 3) "
                          "frames), so only 2, 3 or 4 fps give back every exported frame")
    if not uri.is_local(dest) or (media_root and not uri.is_local(media_root)):
        raise ExportError("DEST and --media-root must be local folders (VITA's loader opens local paths)")
    sdirs, left_out = _stages(out, stage, fmt)
    verdicts: dict[str, Any] = {}
    if not skip_validation:
        from storage.verdict import ValidationRequired, require_verdict

        for s in sdirs:
            try:
                verdicts[s] = require_verdict(out, s)
            except ValidationRequired as err:
                raise ExportError(f"{err} (or pass --skip-validation to export it anyway)") from None
    dest = os.path.abspath(dest)
    root = os.path.abspath(media_root) if media_root else dest
    partial = _prepare_dest(dest)
    cfg = _saved_config(out)
    corpus = str(cfg.get("name", "corpus"))
    tag = hashlib.sha256(os.path.abspath(out).encode() if uri.is_local(out) else out.encode()
                         ).hexdigest()[:6]
    xkeys = {s: f"{safe_name(corpus)[:40]}_{s}_{tag}" for s in sdirs}
    external = {}  # stage -> its media folder outside DEST, written as .partial
    tasks: list[tuple[tuple[int, int], ShardTask]] = []
    total = 0
    for i, s in enumerate(sdirs):
        if fmt == "vita" and root != dest:
            base = os.path.join(root, MEDIA, f"{xkeys[s]}.partial")
            shutil.rmtree(base, ignore_errors=True)
            external[s] = base
        elif fmt == "vita":
            base = os.path.join(partial, MEDIA, xkeys[s])
        else:
            base = os.path.join(partial, "media", s)
        prefix = xkeys[s] if fmt == "vita" else f"media/{s}"
        folder = uri.join(out, s)
        for j, tar in enumerate(sorted(n for n in uri.listdir(folder) if n.endswith(".tar"))):
            shard = uri.join(folder, tar)
            total += shard_count(shard)
            tasks.append(((i, j), ShardTask(
                shard=shard, part=os.path.join(partial, ".parts", s, f"{j:06d}.jsonl"), fmt=fmt,
                media_base=base, media_prefix=prefix, fps=fps, set_prefix=f"{xkeys[s]}/",
                llava_version=llava_version)))
    results: dict[tuple[int, int], ShardResult] = {}
    done = 0
    for t, r in (executor or _InProcess()).map_tasks(export_shard, tasks):
        results[t] = r
        done += r.samples
        if progress is not None:
            progress(done, max(total, done))
    res = ExportResult(dest=dest, format=fmt, stage=",".join(sdirs), left_out=left_out)
    per_stage = _merge(partial, fmt, sdirs, tasks, results, res)
    shutil.rmtree(os.path.join(partial, ".parts"), ignore_errors=True)
    data_config: dict[str, list[str]] = {}
    reingest: dict[str, str] = {}
    kinds: dict[str, str] = {}
    if fmt == "vita":
        chats: list[tuple[str, str]] = []
        sets: set[str] = set()
        no_patch: set[str] = set()
        for s in sdirs:
            st = per_stage[s]
            sets |= set(st["sets"])
            no_patch |= st["no_patch"]
            names = []
            for src in st["lists"]:
                var = ident(f"VitaCorpus_{xkeys[s]}_{src}")
                while var in {v for v, _ in chats}:
                    var += "_"
                chats.append((var, os.path.join(dest, "chat", s, f"{src}.json")))
                names.append(var)
                name = src if len(sdirs) == 1 else f"{ident(s)}_{src}"
                reingest[name] = f"chat/{s}/{src}.json"
                kinds[name] = st["kinds"][src]
            data_config[xkeys[s]] = names
        if len(sdirs) > 1:
            data_config[f"{safe_name(corpus)[:40]}_{tag}_" + "+".join(
                s.removeprefix("stage_") for s in sdirs)] = [v for v, _ in chats]
        write_file(partial, "dataset_config.py",
                   vita_config(root, sorted(sets), sorted(no_patch), chats, data_config).encode())
        write_file(partial, "corpus.yaml", reingest_config(
            cfg, "+".join(s.removeprefix("stage_") for s in sdirs), kinds, reingest,
            MEDIA if root == dest else os.path.join(root, MEDIA)).encode())
    res.data_config = list(data_config)
    summary = {
        "format": fmt, "stages": sdirs, "from": os.path.abspath(out) if uri.is_local(out) else out,
        "corpus": cfg.get("name"), "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "records": res.records, "by_source": dict(sorted(res.by_source.items())),
        "skipped": dict(sorted(res.skipped.items())), "adjusted": dict(sorted(res.adjusted.items())),
        "left_out": left_out, "fps": fps,
        **({"llava_version": llava_version} if fmt == "llava" else {}),
        "validation": ("skipped (--skip-validation)" if skip_validation else
                       {s: {"passed": True, "validated_at": v.get("validated_at")}
                        for s, v in verdicts.items()}),
        "layout": ({"chat": "chat/<stage>/<source>.json", "meta": "meta/<stage>/<source>.meta.jsonl",
                    "AudioFolder": root, "set_folder": os.path.join(root, MEDIA),
                    "media": {s: os.path.join(root, MEDIA, xkeys[s]) for s in sdirs},
                    "dataset_use": list(data_config), "config": "dataset_config.py",
                    "reingest": "corpus.yaml"} if fmt == "vita" else
                   {"data_path": {s: f"{s}.json" for s in sdirs}, "image_folder": dest,
                    "video_folder": dest, "meta": {s: f"{s}.meta.jsonl" for s in sdirs}}),
    }
    write_file(partial, "export.json", (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())
    for base in external.values():  # the media first: DEST never names missing files
        final = base.removesuffix(".partial")
        shutil.rmtree(final, ignore_errors=True)
        if os.path.exists(base):
            os.replace(base, final)
    _commit(partial, dest)
    res.files = {k: os.path.join(dest, v) for k, v in summary["layout"].items()
                 if isinstance(v, str) and not os.path.isabs(v)}
    return res


def _merge(partial: str, fmt: str, sdirs: list[str], tasks: list[tuple[tuple[int, int], ShardTask]],
           results: dict[tuple[int, int], ShardResult], res: ExportResult) -> dict[str, dict[str, Any]]:
    """The shards' part files merged in shard order into the records, meta and skipped files."""
    per_stage: dict[str, dict[str, Any]] = {
        s: {"lists": [], "sets": {}, "no_patch": set(), "kinds": {}} for s in sdirs}
    skipped: IO[str] | None = None
    try:
        for i, s in enumerate(sdirs):
            lists: dict[str, _JsonList] = {}
            metas: dict[str, IO[str]] = {}
            try:
                for t, task in tasks:
                    if t[0] != i:
                        continue
                    r = results[t]
                    st = per_stage[s]
                    for k, v in r.sets.items():
                        st["sets"].setdefault(k, v)
                    st["no_patch"] |= r.no_patch
                    for k, v in r.kinds.items():
                        st["kinds"].setdefault(k, v)
                    res.skipped.update(r.skipped)
                    res.adjusted.update(r.adjusted)
                    with open(task.part, encoding="utf-8") as f:
                        for line in f:
                            item = json.loads(line)
                            if "skip" in item:
                                if skipped is None:
                                    skipped = open(os.path.join(partial, "skipped.jsonl"), "w",  # noqa: SIM115
                                                   encoding="utf-8")
                                skipped.write(json.dumps({"stage": s, **item["skip"]},
                                                         ensure_ascii=False) + "\n")
                                continue
                            src = item["source"] if fmt == "vita" else s
                            if src not in lists:
                                if fmt == "vita":
                                    chat = os.path.join(partial, "chat", s, f"{src}.json")
                                    meta = os.path.join(partial, "meta", s, f"{src}.meta.jsonl")
                                else:
                                    chat = os.path.join(partial, f"{s}.json")
                                    meta = os.path.join(partial, f"{s}.meta.jsonl")
                                os.makedirs(os.path.dirname(meta), exist_ok=True)
                                lists[src] = _JsonList(chat)
                                metas[src] = open(meta, "w", encoding="utf-8")  # noqa: SIM115
                                st["lists"].append(src)
                            lists[src].add(item["record"])
                            metas[src].write(json.dumps(item["meta"], ensure_ascii=False) + "\n")
                            res.records += 1
                            res.by_source[f"{s}/{item['source']}"] += 1
            finally:
                for jl in lists.values():
                    jl.close()
                for m in metas.values():
                    m.close()
            per_stage[s]["lists"].sort()
    finally:
        if skipped is not None:
            skipped.close()
    return per_stage
