"""Transform throughput: tiling, video frame sampling, and Ray scaling, each against baselines.

    .venv/bin/python bench/bench_transforms.py [--images 40] [--videos 3]

1. Tiling one 1920x1080 photo-like JPEG (decode -> 9 tiles -> JPEG q95), per core
   (torch and every library on one thread): our path against (a) InternVL's loader with plain
   PIL (open, convert RGB, resize bicubic, crop, thumbnail from the original) plus the same
   JPEG encoding, and (b) decoding alone (the floor).
2. 16 frames from a 60 s 720p H.264 clip: our exact sampling against decord's get_batch on the
   same frames (VITA's loader) and against decoding every frame; our keyframe mode.
3. The tiling of N images on Ray Data with 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

from schemas.params import TilingConfig, VideoConfig  # noqa: E402
from transforms.tiling import encode_jpeg, reference_tiles, tile_image  # noqa: E402
from transforms.video import ffmpeg_exe, sample_frames, sample_times  # noqa: E402


def photo_jpeg(w: int = 1920, h: int = 1080, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 24, w // 24, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def timed(fn, reps: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_tiling(n: int) -> list[tuple[str, float]]:
    imgs = [photo_jpeg(seed=i) for i in range(4)]
    cfg = TilingConfig()

    def naive():
        for d in imgs:
            [encode_jpeg(t, 95) for t in reference_tiles(d)]

    def ours():
        for d in imgs:
            tile_image(d, cfg)

    def decode():
        for d in imgs:
            Image.open(io.BytesIO(d)).convert("RGB")

    cases = [("decode alone (floor)", decode), ("naive: InternVL loader with PIL + encode", naive),
             ("vita-corpus tile_image", ours)]
    return interleaved(cases, max(3, n // len(imgs)), per_call=len(imgs))


def interleaved(cases, reps: int, per_call: int = 1) -> list[tuple[str, float]]:
    """Median rate per case, the cases taking turns so that machine noise hits all alike."""
    for _, fn in cases:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(reps):
        for name, fn in cases:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return [(name, per_call / statistics.median(times[name])) for name, _ in cases]


def bench_video(n: int) -> list[tuple[str, float]]:
    import decord

    tmp = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    path = tmp / "60s.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=duration=60:size=1280x720:rate=25", "-c:v", "libx264", "-preset",
                    "veryfast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path)],
                   check=True)
    data = path.read_bytes()

    def vita_get_batch():
        vr = decord.VideoReader(str(path), num_threads=1)
        fps = vr.get_avg_fps()
        idx = [min(len(vr) - 1, int(t * fps)) for t in sample_times(len(vr) / fps)]
        vr.get_batch(idx).asnumpy()

    def full_decode():
        vr = decord.VideoReader(str(path), num_threads=1)
        for i in range(len(vr)):
            vr[i]

    def ours_exact():
        sample_frames(data, VideoConfig())

    def ours_key():
        sample_frames(data, VideoConfig(mode="keyframe"))

    reps = max(2, n)
    rows = [("full decode (every frame, decord)", 1 / timed(full_decode, 1)),
            ("VITA's loader: decord get_batch of the 16 frames", 1 / timed(vita_get_batch, reps)),
            ("vita-corpus exact (16 frames, checks, 448 crop)", 1 / timed(ours_exact, reps)),
            ("vita-corpus keyframe mode", 1 / timed(ours_key, reps))]
    os.unlink(path)
    return rows


def bench_ray(n: int) -> list[tuple[str, float]]:
    import ray

    from flows.build.pipeline import build
    from flows.build.ray_exec import RayDataExecutor
    from schemas.config import config_from_dict

    tmp = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    (tmp / "media").mkdir()
    recs = []
    for i in range(8):
        (tmp / "media" / f"{i}.jpg").write_bytes(photo_jpeg(seed=i))
    import json
    for i in range(n):
        recs.append({"id": f"r{i}", "image": f"{i % 8}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A photo."}]})
    (tmp / "recs.json").write_text(json.dumps(recs))
    cfg = config_from_dict({"sources": [{"name": "b", "kind": "caption", "format": "llava",
                                         "path": "recs.json", "media_root": "media"}]}, base=tmp)
    rows = []
    for workers in (1, 2):
        ex = RayDataExecutor(num_cpus=workers, window=4096)
        build(cfg, str(tmp / f"warm{workers}"), executor=ex)  # workers import torch once
        t0 = time.perf_counter()
        build(cfg, str(tmp / f"out{workers}"), executor=ex)
        rows.append((f"Ray Data build, {workers} worker(s)", n / (time.perf_counter() - t0)))
        ray.shutdown()
    return rows


def table(title: str, rows: list[tuple[str, float]], unit: str) -> None:
    print(f"\n{title}")
    print(f"| {'case':<52} | {unit:>10} |")
    print(f"|{'-' * 54}|{'-' * 12}:|")
    for name, v in rows:
        print(f"| {name:<52} | {v:10.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--videos", type=int, default=3)
    ap.add_argument("--ray-images", type=int, default=200)
    ap.add_argument("--skip", default="", help="comma list of: tiling,video,ray")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    print(f"{os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    if "tiling" not in skip:
        rows = bench_tiling(args.images)
        table("1920x1080 JPEG -> tiles (one core)", rows, "images/s")
        d, naive, ours = (r[1] for r in rows)
        print(f"\nours / naive: {ours / naive:.2f}x; decode alone / ours: {d / ours:.2f}x")
    if "video" not in skip:
        rows = bench_video(args.videos)
        table("16 frames from a 60 s 720p clip (one core)", rows, "videos/s")
        full, vita, ours, key = (r[1] for r in rows)
        print(f"\nexact / get_batch: {ours / vita:.2f}x; exact / full decode: {ours / full:.1f}x; "
              f"keyframe / full decode: {key / full:.1f}x")
    if "ray" not in skip:
        rows = bench_ray(args.ray_images)
        table(f"{args.ray_images} images tiled through the whole build", rows, "images/s")
        print(f"\n2 workers / 1 worker: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
