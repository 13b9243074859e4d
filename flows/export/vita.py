"""VITA-1.5's format: the record with its paths under FolderDict[set] and AudioFolder/audio, the
dataset_config.py lines for vita/config, a config that re-ingests the export with our reader,
and the check that every path a record names is there.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

from flows.export.media import MEDIA, MediaFiles, safe_name

_PH = re.compile(r"<(image|video|audio)>")


def vita_record(rec: dict[str, Any], members: dict[str, bytes], media: MediaFiles, key: str
                ) -> dict[str, Any]:
    """The sample as VITA reads it: its paths under the set's folder and AudioFolder/audio."""
    folder = safe_name(str(rec.get("set") or (rec.get("meta") or {}).get("source", "set")))
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


def kind_of(meta: dict[str, Any]) -> str:
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
