"""VITA-1.5's and LLaVA's loader rules, written for the tests from reading their code (VITA:
vita/util/data_utils_video_audio_neg_patch.py at 35d064a; LLaVA: llava/train/train.py), so an
export is checked the way their loaders meet it, without their code or their dependencies.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image


def vita_grid_tiles(w: int, h: int, max_num: int = 12, size: int = 448) -> int:
    """dynamic_preprocess's tile count: the closest aspect ratio among grids of min 1 to max_num
    tiles (visited by area; a tie goes to the later grid when the image is large enough), plus
    the thumbnail when there is more than one tile."""
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, diff = (1, 1), float("inf")
    for r in ratios:
        d = abs(w / h - r[0] / r[1])
        if d < diff:
            best, diff = r, d
        elif d == diff and w * h > 0.5 * size * size * r[0] * r[1]:
            best = r
    n = best[0] * best[1]
    return n + 1 if n != 1 else 1


def vita_image_tokens(conversations: list[dict[str, Any]], patch_num: list[int]) -> list[int]:
    """preprocess_multimodal: the k-th turn holding <image> replaces each of its <image> with
    patch_num[k] image tokens (k advances once per turn). Tokens per <image>, in order."""
    out, k = [], 0
    for turn in conversations:
        n = turn["value"].count("<image>")
        if n:
            out += [patch_num[k]] * n  # VITA raises IndexError past the end: so do we
            k += 1
    return out


def vita_frame_positions(n_frames: int, fps: float, framerate: int = 3, max_frames: int = 16,
                         min_frames: int = 4) -> list[int]:
    """_get_rawvideo_dec at its default video_framerate: every round(fps / framerate)-th frame,
    then np.linspace down to max_frames or up to min_frames."""
    stride = int(round(float(fps) / framerate))
    pos = list(range(0, n_frames, stride))  # stride 0 raises ValueError, as in VITA
    if len(pos) > max_frames:
        return [pos[i] for i in np.linspace(0, len(pos) - 1, num=max_frames, dtype=int)]
    if len(pos) < min_frames:
        return [pos[i] for i in np.linspace(0, len(pos) - 1, num=min_frames, dtype=int)]
    return pos


def vita_load(r: dict[str, Any], conf: dict[str, Any]) -> dict[str, Any]:
    """One record as LazySupervisedDataset.__getitem__ meets it (square aspect ratio): the pixel
    tensors per image, the image tokens per <image>, the video frames taken, the audio files."""
    from decord import VideoReader, cpu

    folders, no_patch = conf["FolderDict"], conf.get("NoPatchSets", [])
    got: dict[str, Any] = {"patch_num": [], "tokens": [], "frames": None, "audio": []}
    if "image" in r:
        files, sets = r["image"], r["set"]
        if isinstance(files, list):
            assert isinstance(sets, list)
            for f, s in zip(files, sets, strict=True):
                with Image.open(os.path.join(folders[s], f)) as im:
                    got["patch_num"].append(1 if s in no_patch else vita_grid_tiles(*im.size))
        else:  # one image: tiled whatever its set
            with Image.open(os.path.join(folders[sets], files)) as im:
                got["patch_num"].append(vita_grid_tiles(*im.size))
        got["tokens"] = vita_image_tokens(r["conversations"], got["patch_num"])
    if "video" in r:
        vr = VideoReader(os.path.join(folders[r["set"]], r["video"]), ctx=cpu(0))
        got["frames"] = vita_frame_positions(len(vr), vr.get_avg_fps())
        got["n_video_frames"] = len(vr)
    for a in r.get("audio") or []:
        path = os.path.join(conf["AudioFolder"], "audio", a)
        assert os.path.isfile(path), path
        got["audio"].append(path)
    return got


def llava15_reads(r: dict[str, Any]) -> bool:
    """LLaVA-1.5's LazySupervisedDataset: `image` a str joined under --image_folder, no video or
    audio key, and <image> (its only placeholder) once with an image and never without."""
    if "video" in r or "audio" in r or ("image" in r and not isinstance(r["image"], str)):
        return False
    text = "".join(t["value"] for t in r["conversations"])
    if "<video>" in text or "<audio>" in text:
        return False
    return text.count("<image>") == (1 if "image" in r else 0)
