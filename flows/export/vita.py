"""VITA-1.5's format: the record with its paths under FolderDict[set] and AudioFolder/audio, the
dataset_config.py lines for vita/config (written as plain values, read back by parsing, never
run), a config that re-ingests the export with our reader, and the check of an export as VITA's
loader (vita/util/data_utils_video_audio_neg_patch.py) would meet it.
"""
from __future__ import annotations

import ast
import json
import os
import re
from collections import Counter
from typing import Any

from flows.export.media import MEDIA, ExportError, MediaFiles, image_tiles, safe_name

_PH = re.compile(r"<(image|video|audio)>")

# VITA's _get_rawvideo_dec samples at video_framerate=3 (its dataset never passes another): a
# stride of round(fps / 3) frames, then linspace to 16 above 16 and to 4 below 4. A video written
# at 2 to 4 fps has stride 1, so VITA takes back every frame we sampled (4 to 16 of them).
VITA_FRAMERATE = 3
VITA_FPS = 3
VITA_MIN_FRAMES, VITA_MAX_FRAMES = 4, 16

NO_PATCH = ("several images of different tile counts share a turn, and VITA gives every <image> "
            "of a turn the tile count of the turn's first image: the record's set is in "
            "NoPatchSets and each image is its 448x448 thumbnail (one tile each)")


def vita_stride(fps: float) -> int:
    return int(round(float(fps) / VITA_FRAMERATE))


def turn_tokens(conversations: list[dict[str, Any]], patches: list[int]) -> list[int]:
    """The image tokens VITA's preprocess_multimodal gives each <image>, in order: every <image>
    of the k-th turn that holds one gets patches[k] (0 where VITA would run out of images)."""
    out: list[int] = []
    k = 0
    for turn in conversations:
        n = str(turn.get("value", "")).count("<image>")
        if n:
            out += [patches[k] if k < len(patches) else 0] * n
            k += 1
    return out


def vita_record(rec: dict[str, Any], members: dict[str, bytes], media: MediaFiles, key: str,
                set_prefix: str = "") -> tuple[dict[str, Any], str | None]:
    """The sample as VITA reads it, and why its images are thumbnails (None: they are tiles).

    Images keep their tiles when VITA's per-turn count gives each image its own tile count;
    otherwise (several images of different grids in one turn) the record goes to the set's
    no-patch twin, listed in NoPatchSets, where VITA takes each image as one tile."""
    folder = safe_name(str(rec.get("set") or (rec.get("meta") or {}).get("source", "set")))
    set_key = f"{set_prefix}{rec.get('set') or folder}"
    out: dict[str, Any] = {"id": rec["id"], "set": set_key}
    note = None
    if rec.get("image"):
        tiles = image_tiles(rec)
        many = isinstance(rec["image"], list)
        nopatch = many and bool(tiles) and turn_tokens(rec["conversations"], tiles) != tiles
        images = media.images(rec, members, folder, key, thumbnails=nopatch)
        if nopatch:
            note = NO_PATCH
            set_key = f"{set_key}/nopatch"
        if many:
            out["image"] = images
            out["set"] = [set_key] * len(images)  # VITA pairs a list of images with a list
        else:
            out["image"] = images[0]
    if rec.get("video"):
        out["video"] = media.video(rec, members, folder, key)
    if rec.get("audio"):
        out["audio"] = media.audio(rec, members, folder, key)
    out["conversations"] = rec["conversations"]
    return out, note


def kind_of(meta: dict[str, Any]) -> str:
    task = str(meta.get("task", "qa"))
    return task if task in ("caption", "qa", "ocr", "video", "text", "asr", "tts_pair") else "qa"


def ident(name: str) -> str:
    """A Python identifier made of `name`'s ASCII letters and digits (others become _)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return out if out[:1].isalpha() or out[:1] == "_" else f"_{out}"


def vita_config(audio_folder: str, sets: list[str], no_patch: list[str],
                chats: list[tuple[str, str]], data_config: dict[str, list[str]]) -> str:
    """VITA's vita/config lines for an export. Every value read from a config or a record goes
    through repr(), and the comments hold none, so no name can become code: the file is only
    plain assignments, which read_vita_config parses back without running it.

    chats: (variable, chat_path) pairs; data_config: --dataset_use key -> variables."""
    media = os.path.join(audio_folder, MEDIA)
    variables = {v for v, _ in chats}
    assert all(v.isidentifier() and v.isascii() for v in variables), variables
    assert all(v in variables for vs in data_config.values() for v in vs)
    lines = ["# Written by `vita-corpus export` (export.json says from what). Merge into VITA's",
             "# vita/config/dataset_config.py; DataConfig and NoPatchSets go to vita/config/__init__.py",
             "# (add the entries to VITA's own). Train with --image_aspect_ratio square.",
             "# VITA reads audio at AudioFolder/audio/<path>, images and videos at FolderDict[set]/<path>.",
             f"AudioFolder = {audio_folder!r}",
             "FolderDict = {"]
    lines += [f"    {s!r}: {media!r}," for s in sorted(sets)]
    lines += ["}", "NoPatchSets = ["]
    lines += [f"    {s!r}," for s in sorted(no_patch)]
    lines.append("]")
    lines += [f"{var} = {{'chat_path': {path!r}, 'data_ratio': 1.0}}" for var, path in chats]
    lines.append("DataConfig = {")
    lines += [f"    {use!r}: [{', '.join(vs)}]," for use, vs in data_config.items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _value(node: ast.expr, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_value(k, env): _value(v, env) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, env) for e in node.elts]
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    raise ValueError(f"line {node.lineno}: {ast.unparse(node)[:80]!r} is not a plain value")


def read_vita_config(text: str) -> dict[str, Any]:
    """The names a dataset_config.py assigns, read by parsing it (it is never run): only
    assignments of literals, lists and dicts, and names assigned above, are allowed."""
    env: dict[str, Any] = {}
    for node in ast.parse(text).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"line {node.lineno}: {ast.unparse(node)[:80]!r} is not an assignment")
        env[node.targets[0].id] = _value(node.value, env)
    return env


def merge_vita_configs(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several exports' configs as one VITA config; refused where they disagree (one AudioFolder
    in VITA: exports to merge are made with the same --media-root)."""
    audio = {c["AudioFolder"] for c in configs}
    if len(audio) != 1:
        raise ExportError(f"the exports have different AudioFolders {sorted(audio)}: VITA has one; "
                          "export them with the same --media-root")
    merged: dict[str, Any] = {"AudioFolder": audio.pop(), "FolderDict": {}, "NoPatchSets": [],
                              "DataConfig": {}}
    for c in configs:
        for table in ("FolderDict", "DataConfig"):
            for k, v in c[table].items():
                if merged[table].get(k, v) != v:
                    raise ExportError(f"{table} key {k!r} means two things in the exports")
                merged[table][k] = v
        merged["NoPatchSets"] += [s for s in c.get("NoPatchSets", []) if s not in merged["NoPatchSets"]]
    return merged


def reingest_config(cfg: dict[str, Any], name: str, kinds: dict[str, str],
                    lists: dict[str, str], media_root: str) -> str:
    """A corpus config that reads the export back with our own `vita` reader (lists: source
    name -> chat path inside the export)."""
    import yaml

    transforms = dict(cfg.get("transforms") or {})
    transforms["speech"] = {**(transforms.get("speech") or {}), "enabled": False}
    srcs = [{"name": s, "kind": kinds[s], "format": "vita", "path": path,
             "media_root": media_root} for s, path in lists.items()
            if kinds.get(s) not in ("asr", "tts_pair")]
    doc = {"name": f"{cfg.get('name', 'corpus')}-{name}-export", "seed": cfg.get("seed", 1234),
           "transforms": transforms, "sources": srcs}
    head = ("# Reads this export back with vita-corpus (`vita-corpus build -c corpus.yaml -o OUT2"
            " --stages none`).\n# ASR and text-speech pairs are left out: their sources read "
            "other formats.\n")
    return head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def check_vita_export(dest: str) -> list[str]:
    """Problems with an export as VITA's loader would meet them (empty: none): every record's
    set names a folder, every path exists there, placeholders match the media, VITA's per-turn
    <image> count gives each image its own tiles, and VITA's video sampling takes every frame."""
    try:
        with open(os.path.join(dest, "dataset_config.py"), encoding="utf-8") as f:
            conf = read_vita_config(f.read())
    except (OSError, SyntaxError, ValueError) as err:
        return [f"dataset_config.py: {err}"]
    missing = [n for n in ("AudioFolder", "FolderDict", "DataConfig") if n not in conf]
    if missing:
        return [f"dataset_config.py assigns no {', '.join(missing)}"]
    return check_vita_records(conf)


def check_vita_records(conf: dict[str, Any]) -> list[str]:
    problems = []
    paths = dict.fromkeys(e["chat_path"] for es in conf["DataConfig"].values() for e in es)
    for path in paths:  # a combined DataConfig entry names the stages' files again
        with open(path, encoding="utf-8") as f:
            for r in json.load(f):
                problems += _check_record(r, conf)
    return problems


def _tiles_of(path: str, no_patch: bool) -> int | None:
    """VITA's tile count for an exported image: 1 in a no-patch set, else its grid (an image of
    cols*448 x rows*448 tiles to that grid) and the thumbnail; None for another size."""
    from PIL import Image

    if no_patch:
        return 1
    with Image.open(path) as im:
        w, h = im.size
    if w % 448 or h % 448:
        return None
    n = (w // 448) * (h // 448)
    return n + (n > 1)


def _video_problem(path: str) -> str | None:
    from decord import VideoReader, cpu

    vr = VideoReader(path, ctx=cpu(0))
    n, stride = len(vr), vita_stride(vr.get_avg_fps())
    if stride < 1:
        return f"VITA's stride at {vr.get_avg_fps():.2f} fps is 0 (it raises)"
    taken = len(range(0, n, stride))
    if stride != 1 or not VITA_MIN_FRAMES <= taken <= VITA_MAX_FRAMES:
        return f"VITA takes {taken} of its {n} frames (stride {stride})"
    return None


def _check_record(r: dict[str, Any], conf: dict[str, Any]) -> list[str]:
    folders, no_patch = conf["FolderDict"], set(conf.get("NoPatchSets") or [])
    out = []
    rid = r.get("id")
    convs = r.get("conversations", [])
    counts = Counter(m.group(1) for t in convs for m in _PH.finditer(t.get("value", "")))
    images = r.get("image")
    many = isinstance(images, list)
    images = [] if images is None else images if many else [images]
    sets = r.get("set")
    sets = sets if isinstance(sets, list) else [sets] * max(1, len(images))
    for s in set(sets):
        if s not in folders:
            out.append(f"{rid}: set {s!r} is not in FolderDict")
    if many and not isinstance(r.get("set"), list):
        out.append(f"{rid}: a list of images needs a list of sets")
    tiles: list[int | None] = []
    for i, p in enumerate(images):
        s = sets[i] if i < len(sets) else sets[0]
        full = os.path.join(folders.get(s, ""), p)
        if not os.path.isfile(full):
            out.append(f"{rid}: image {p} not under {folders.get(s)}")
            continue
        tiles.append(_tiles_of(full, many and s in no_patch))
    if images and len(tiles) == len(images):
        if None in tiles:  # sizes VITA tiles by its own rule: only one <image> a turn is safe
            if any(str(t.get("value", "")).count("<image>") > 1 for t in convs):
                out.append(f"{rid}: several <image> in one turn with images of unknown grids")
        elif turn_tokens(convs, tiles) != tiles:  # type: ignore[arg-type]
            out.append(f"{rid}: VITA's per-turn count gives {turn_tokens(convs, tiles)} image "  # type: ignore[arg-type]
                       f"tokens for images of {tiles} tiles")
    if r.get("video"):
        full = os.path.join(folders.get(sets[0], ""), r["video"])
        if not os.path.isfile(full):
            out.append(f"{rid}: video {r['video']} not under {folders.get(sets[0])}")
        elif (why := _video_problem(full)) is not None:
            out.append(f"{rid}: video {r['video']}: {why}")
    for p in r.get("audio") or []:
        if not os.path.isfile(os.path.join(conf["AudioFolder"], MEDIA, p)):
            out.append(f"{rid}: audio {p} not under {conf['AudioFolder']}/{MEDIA}")
    if any("<audio>" in str(t.get("value", "")) for t in convs if t.get("from") == "gpt"):
        out.append(f"{rid}: <audio> in an answer (VITA reads it as input audio)")
    want = {"image": len(images), "video": 1 if r.get("video") else 0,
            "audio": len(r.get("audio") or [])}
    for k, n in want.items():
        if counts[k] != n:
            out.append(f"{rid}: {counts[k]} <{k}> placeholders for {n} {k} files")
    return out
