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

import io
import json
import os
import posixpath
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from storage import uri
from storage.shards import iter_samples

FORMATS = ("vita", "llava")
MEDIA = "audio"  # VITA joins audio paths under AudioFolder/"audio": the shared media folder
_PH = re.compile(r"<(image|video|audio)>")
# Why a sample is not in an export (written to DEST/skipped.jsonl, counted in export.json).
SKIP_REASONS = {
    "audio_not_in_format": "the format has no audio and the audio is not a spoken question",
    "sample_unreadable": "the sample has no readable JSON member",
}


class ExportError(RuntimeError):
    """The export cannot be made; the message says why and what to do."""


class NotExported(Exception):
    """One sample the format cannot hold."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


# --- media ---------------------------------------------------------------------------------

def grid_image(members: dict[str, bytes], names: list[str], cols: int, rows: int,
               size: int) -> bytes:
    """The tiles of one image pasted back row-major into its (cols*size, rows*size) grid."""
    from PIL import Image

    canvas = Image.new("RGB", (cols * size, rows * size))
    for i, name in enumerate(names[: cols * rows]):
        tile = Image.open(io.BytesIO(members[name])).convert("RGB")
        if tile.size != (size, size):
            tile = tile.resize((size, size), Image.BICUBIC)
        canvas.paste(tile, ((i % cols) * size, (i // cols) * size))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def frames_video(frames: list[bytes], path: str, fps: int = 1) -> None:
    """JPEG frames as an H.264 mp4 at `fps`, with the ffmpeg imageio-ffmpeg ships."""
    import imageio_ffmpeg

    tmp = f"{path}.tmp.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
           "-f", "image2pipe", "-c:v", "mjpeg", "-framerate", str(fps), "-i", "pipe:0",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
           "-r", str(fps), "-movflags", "+faststart", tmp]
    run = subprocess.run(cmd, input=b"".join(frames), capture_output=True)
    if run.returncode != 0:
        raise ExportError(f"ffmpeg could not encode {path}: {run.stderr.decode()[-500:]}")
    os.replace(tmp, path)


def _write(root: str, rel: str, data: bytes) -> None:
    full = os.path.join(root, rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    tmp = f"{full}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, full)


class _Media:
    """Writes one sample's media under `root` and returns the paths its record names."""

    def __init__(self, root: str, prefix: str, fps: int) -> None:
        self.root, self.prefix, self.fps = root, prefix, fps  # prefix: inside `root`

    def images(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str
               ) -> list[str]:
        meta = rec.get("meta") or {}
        listed = (meta.get("members") or {}).get("image") or sorted(
            n for n in members if n.startswith(("tile_", "image_")))
        tiling = meta.get("tiling") or {}
        size = int((tiling.get("params") or {}).get("image_size", 448))
        paths = []
        if tiling.get("images"):
            for i, im in enumerate(tiling["images"]):
                cols, rows = im["grid"]
                first = im.get("first_tile", 0)
                rel = f"images/{folder}/{key}_{i}.jpg"
                _write(self.root, posixpath.join(self.prefix, rel),
                       grid_image(members, listed[first:first + cols * rows], cols, rows, size))
                paths.append(rel)
        else:  # passed through untransformed: the file itself
            for i, name in enumerate(listed):
                rel = f"images/{folder}/{key}_{i}{os.path.splitext(name)[1] or '.jpg'}"
                _write(self.root, posixpath.join(self.prefix, rel), members[name])
                paths.append(rel)
        return paths

    def video(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str) -> str:
        listed = ((rec.get("meta") or {}).get("members") or {}).get("video") or sorted(
            n for n in members if n.startswith(("frame_", "video_")))
        if listed and listed[0].startswith("video_"):
            rel = f"videos/{folder}/{key}{os.path.splitext(listed[0])[1] or '.mp4'}"
            _write(self.root, posixpath.join(self.prefix, rel), members[listed[0]])
            return rel
        rel = f"videos/{folder}/{key}.mp4"
        full = os.path.join(self.root, self.prefix, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        frames_video([members[n] for n in listed], full, self.fps)
        return rel

    def audio(self, rec: dict[str, Any], members: dict[str, bytes], folder: str, key: str
              ) -> list[str]:
        listed = ((rec.get("meta") or {}).get("members") or {}).get("audio") or sorted(
            n for n in members if n.startswith("audio_"))
        paths = []
        for i, name in enumerate(listed):
            rel = f"speech/{folder}/{key}_{i}{os.path.splitext(name)[1] or '.flac'}"
            _write(self.root, posixpath.join(self.prefix, rel), members[name])
            paths.append(rel)
        return paths


# --- records -------------------------------------------------------------------------------

def vita_record(rec: dict[str, Any], members: dict[str, bytes], media: _Media, key: str
                ) -> dict[str, Any]:
    """The sample as VITA reads it: its paths under the set's folder and AudioFolder/audio."""
    folder = _safe(str(rec.get("set") or (rec.get("meta") or {}).get("source", "set")))
    out: dict[str, Any] = {"id": rec["id"], "set": rec.get("set") or folder}
    if rec.get("image"):
        images = media.images(rec, members, folder, key)
        if isinstance(rec["image"], list):
            out["image"] = images
            out["set"] = [out["set"]] * len(images)  # VITA pairs a list of images with a list
        else:
            out["image"] = images[0]
    if rec.get("video"):
        out["video"] = media.video(rec, members, folder, key)
    if rec.get("audio"):
        out["audio"] = media.audio(rec, members, folder, key)
    out["conversations"] = rec["conversations"]
    return out


def llava_record(rec: dict[str, Any], members: dict[str, bytes], media: _Media, key: str
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
    folder = _safe(str(rec.get("set") or meta.get("source", "set")))
    out: dict[str, Any] = {"id": rec["id"]}
    if rec.get("image"):
        images = media.images(rec, members, folder, key)
        out["image"] = images if isinstance(rec["image"], list) else images[0]
    if rec.get("video"):
        out["video"] = media.video(rec, members, folder, key)
    out["conversations"] = convs
    return out


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
        from flows.validate import ValidationRequired, require_verdict

        try:
            verdict = require_verdict(out, sdir)
        except ValidationRequired as err:
            raise ExportError(f"{err} (or pass --skip-validation to export it anyway)") from None
    dest = os.path.abspath(dest)
    partial = _prepare_dest(dest)
    res = ExportResult(dest=dest, format=fmt, stage=sdir)
    media = _Media(partial, MEDIA if fmt == "vita" else "", fps)
    lists: dict[str, _JsonList] = {}
    metas: dict[str, IO[str]] = {}
    sets: dict[str, str] = {}  # set -> source
    kinds: dict[str, str] = {}
    skipped: IO[str] | None = None
    name = _safe(f"{sdir}")
    try:
        for tar in sorted(n for n in uri.listdir(folder) if n.endswith(".tar")):
            for key, members in iter_samples(uri.join(folder, tar)):
                try:
                    if "json" not in members:
                        raise NotExported("sample_unreadable", f"{tar}: {key}")
                    rec = json.loads(members["json"])
                    meta = rec.get("meta") or {}
                    src = _safe(str(meta.get("source") or rec.get("set") or "samples"))
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
                kinds.setdefault(src, _kind_of(meta))
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
        _write(partial, "dataset_config.py",
               vita_config(dest, sdir, cfg.get("name", "corpus"), sorted(lists), sets).encode())
        _write(partial, "corpus.yaml", reingest_config(cfg, sdir, kinds, list(lists)).encode())
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
    _write(partial, "export.json", (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())
    _commit(partial, dest)
    res.files = {k: os.path.join(dest, v) for k, v in summary["layout"].items()
                 if isinstance(v, str) and not os.path.isabs(v)}
    return res


def _kind_of(meta: dict[str, Any]) -> str:
    task = str(meta.get("task", "qa"))
    return task if task in ("caption", "qa", "ocr", "video", "text", "asr", "tts_pair") else "qa"


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name)


def vita_config(dest: str, stage: str, corpus: str, sources: list[str], sets: dict[str, str]
                ) -> str:
    """The lines of VITA's vita/config/dataset_config.py (and __init__.py) for this export."""
    folder = os.path.join(dest, MEDIA)
    use = _ident(f"vita_corpus_{corpus}_{stage}")
    lines = [f"# vita-corpus export of {stage} ({corpus}). Merge into VITA's",
             "# vita/config/dataset_config.py; the DataConfig entry goes to vita/config/__init__.py,",
             f"# then train with --dataset_use {use} --image_aspect_ratio square.",
             f"AudioFolder = {dest!r}  # VITA reads AudioFolder/audio/<record audio path>",
             "FolderDict = {"]
    lines += [f"    {s!r}: {folder!r}," for s in sorted(sets)]
    lines.append("}")
    names = []
    for src in sources:
        var = _ident(f"VitaCorpus_{stage}_{src}")
        names.append(var)
        lines.append(f"{var} = {{\"chat_path\": {os.path.join(dest, 'chat', f'{src}.json')!r}, "
                     f"\"data_ratio\": 1.0}}")
    lines.append(f"DataConfig = {{{use!r}: [{', '.join(names)}]}}")
    return "\n".join(lines) + "\n"


def reingest_config(cfg: dict[str, Any], stage: str, kinds: dict[str, str], sources: list[str]
                    ) -> str:
    """A corpus config that reads the export back with our own `vita` reader."""
    import yaml

    transforms = dict(cfg.get("transforms") or {})
    transforms["speech"] = {**(transforms.get("speech") or {}), "enabled": False}
    srcs = [{"name": s, "kind": kinds[s], "format": "vita", "path": f"chat/{s}.json",
             "media_root": MEDIA} for s in sources if kinds.get(s) not in ("asr", "tts_pair")]
    doc = {"name": f"{cfg.get('name', 'corpus')}-{stage}-export", "seed": cfg.get("seed", 1234),
           "transforms": transforms, "sources": srcs}
    head = ("# Reads this export back with vita-corpus (`vita-corpus build -c corpus.yaml -o OUT2"
            " --stages none`).\n# ASR and text-speech pairs are left out: their sources read "
            "other formats.\n")
    return head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


# --- the check -----------------------------------------------------------------------------

def check_vita_export(dest: str) -> list[str]:
    """Problems with an export as VITA's loader would meet them (empty: none): every record's
    set names a folder, every path exists there, and placeholders match the media."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vita_dataset_config",
                                                  os.path.join(dest, "dataset_config.py"))
    assert spec and spec.loader
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    problems = []
    for entries in conf.DataConfig.values():
        for entry in entries:
            with open(entry["chat_path"], encoding="utf-8") as f:
                records = json.load(f)
            for r in records:
                problems += _check_record(r, conf.FolderDict, conf.AudioFolder)
    return problems


def _check_record(r: dict[str, Any], folders: dict[str, str], audio_folder: str) -> list[str]:
    out = []
    rid = r.get("id")
    counts = Counter(m.group(1) for t in r.get("conversations", [])
                     for m in _PH.finditer(t.get("value", "")))
    images = r.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    sets = r.get("set")
    sets = sets if isinstance(sets, list) else [sets] * max(1, len(images))
    for s in sets:
        if s not in folders:
            out.append(f"{rid}: set {s!r} is not in FolderDict")
    if isinstance(r.get("image"), list) and not isinstance(r.get("set"), list):
        out.append(f"{rid}: a list of images needs a list of sets")
    for i, p in enumerate(images):
        s = sets[i] if i < len(sets) else sets[0]
        if s in folders and not os.path.isfile(os.path.join(folders[s], p)):
            out.append(f"{rid}: image {p} not under {folders[s]}")
    if r.get("video"):
        s = sets[0]
        if s in folders and not os.path.isfile(os.path.join(folders[s], r["video"])):
            out.append(f"{rid}: video {r['video']} not under {folders[s]}")
    for p in r.get("audio") or []:
        if not os.path.isfile(os.path.join(audio_folder, "audio", p)):
            out.append(f"{rid}: audio {p} not under {audio_folder}/audio")
    want = {"image": len(images), "video": 1 if r.get("video") else 0,
            "audio": len(r.get("audio") or [])}
    for k, n in want.items():
        if counts[k] != n:
            out.append(f"{rid}: {counts[k]} <{k}> placeholders for {n} {k} files")
    return out
