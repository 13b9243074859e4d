"""Hostile inputs (issue 25): a worker's peak memory on the worst of them, and what the guarded
open costs on the scale corpus.

    .venv/bin/python bench/bench_hostile.py [--scale 10000] [--rounds 2] [--cases all]
                                            [--before /path/to/an/older/checkout]

1. Peak RSS. Each case is a build (in-process executor: the build's process is the worker) of
   one hostile input beside one good one, with the default limits, in a fresh child process:
   its peak resident memory (ru_maxrss) and what became of the hostile input. The `good` case
   (the good input alone) is the floor every case pays: Python, torch, OpenCV, decord.
   Target: every case under 1.5 GB. With --before, the same cases also run against another
   checkout (the code before issue 25), capped at 6 GB of address space so that what would
   take the machine down ends in MemoryError instead; they are marked there.
2. The guarded open's cost. The scale corpus (`vita-corpus demo --scale N`'s inputs) is
   ingested in-process --rounds times with the guard and as many times without it (media read
   as before: the path checked, then read whole; source files opened plainly), alternating, in
   one process; and every open is timed in both, so the guard's own share of the build is
   measured directly as well as from the builds' wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers that make media

TARGET_MB = 1536


# --- the hostile inputs ------------------------------------------------------------------------

def _png(w: int, h: int, depth: int, color_type: int) -> bytes:
    row = b"\0" + bytes(w * {0: 1, 2: 3}[color_type] * depth // 8)
    z = zlib.compressobj(9)
    raw = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth,
                                                               color_type, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _long_flac(path: Path, hours: float, sr: int, channels: int) -> None:
    import numpy as np
    import soundfile as sf

    block = np.zeros((sr * 60, channels), np.int16)  # silence: 10 hours in a few MB
    with sf.SoundFile(path, "w", sr, channels, "PCM_16", format="FLAC") as f:
        for _ in range(int(hours * 60)):
            f.write(block)


def _lying_flac(path: Path) -> None:
    from conftest import write_flac

    write_flac(path, 1.0)
    data = bytearray(path.read_bytes())
    v = int.from_bytes(data[18:26], "big")
    data[18:26] = ((v & ~((1 << 36) - 1)) | ((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(bytes(data))


def _lying_mov(path: Path) -> None:
    from conftest import clip
    from test_hostile import lying_mov

    base = clip(path.with_suffix(".base.mp4"), 1)
    lying_mov(base, path, 100_000_000)
    base.unlink()


def _junk(path: Path, size: int, head: bytes) -> None:
    with open(path, "wb") as f:
        f.write(head)
        chunk = os.urandom(1 << 20)
        left = size - len(head)
        while left > 0:
            f.write(chunk[:left])
            left -= len(chunk)


# name -> (how to make it under root, the record's fields / the source it goes in)
def make_case(name: str, root: Path) -> dict:
    """Write the case's files under `root`; return its config (the good input included)."""
    from conftest import write_flac, write_image

    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    write_image(media / "good.jpg", (64, 48))
    write_flac(media / "good.flac", 1.0)
    image = video = audio = None
    json_text = None
    transcript = None
    if name == "good":
        pass
    elif name == "fifo_image":
        os.mkfifo(media / "x.jpg")
        image = "x.jpg"
    elif name == "device_image":
        os.mknod(media / "x.jpg", 0o20644, os.makedev(1, 5))  # a character device: /dev/zero
        image = "x.jpg"
    elif name in ("sparse_8g_image", "sparse_64g_image"):
        with open(media / "x.jpg", "wb") as f:
            f.truncate((8 if "8g" in name else 64) * 2**30)
        image = "x.jpg"
    elif name == "image_at_size_limit":
        _junk(media / "x.jpg", 128 * 2**20 - 1, b"\xff\xd8\xff\xe0")
        image = "x.jpg"
    elif name == "png16_grey_10000x9999":
        (media / "x.png").write_bytes(_png(10000, 9999, 16, 0))
        image = "x.png"
    elif name == "png16_rgb_10000x9999":
        (media / "x.png").write_bytes(_png(10000, 9999, 16, 2))
        image = "x.png"
    elif name == "jpeg_10000x9999":
        import numpy as np
        from PIL import Image

        Image.fromarray(np.full((9999, 10000, 3), 120, np.uint8)).save(media / "x.jpg", quality=80)
        image = "x.jpg"
    elif name == "flac_10h_48k_stereo":
        _long_flac(media / "x.flac", 10, 48000, 2)
        audio = "x.flac"
    elif name == "flac_10h_16k_mono":
        _long_flac(media / "x.flac", 10, 16000, 1)
        audio = "x.flac"
    elif name == "flac_header_2^36_samples":
        _lying_flac(media / "x.flac")
        audio = "x.flac"
    elif name == "mov_100M_frames":
        _lying_mov(media / "x.mov")
        video = "x.mov"
    elif name == "video_at_size_limit":
        _junk(media / "x.mp4", 512 * 2**20 - 1, b"\0\0\0\x18ftypisom\0\0\0\0isomavc1")
        video = "x.mp4"
    elif name == "json_100k_deep":
        json_text = "[" * 100_000 + "]" * 100_000
    elif name == "json_200mb_string":
        json_text = '{"id": "big", "s": "' + "x" * (200 * 2**20) + '"}'
    elif name == "transcript_linked_to_etc_passwd":
        transcript = "/etc/passwd"
    else:
        raise ValueError(f"unknown case {name!r}")

    good = {"id": "good", "image": "good.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]}
    recs = [json.dumps(good)]
    kind = "caption"
    if image:
        recs.append(json.dumps({**good, "id": "hostile", "image": image}))
    if video:
        from conftest import clip

        kind = "video"
        clip(media / "good.mp4", 2)
        recs = [json.dumps({"id": vid, "video": rel, "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "?"}]})
                for vid, rel in (("good", "good.mp4"), ("hostile", video))]
    if json_text:
        recs.append(json_text)
    with open(root / "src.json", "w") as f:
        f.write("[" + ",".join(recs) + "]")
    sources = [{"name": "src", "kind": kind, "format": "llava", "path": "src.json",
                "media_root": "media"}]
    if audio:
        (root / "asr.jsonl").write_text(
            json.dumps({"id": "good_a", "audio": "good.flac", "text": "good"}) + "\n"
            + json.dumps({"id": "hostile", "audio": audio, "text": "long"}) + "\n")
        sources.append({"name": "asr", "kind": "asr", "format": "asr_jsonl",
                        "path": "asr.jsonl", "media_root": "media"})
    if transcript:
        ls = root / "ls" / "1" / "2"
        ls.mkdir(parents=True)
        write_flac(ls / "root.flac", 1.0)
        os.symlink(transcript, ls / "1-2.trans.txt")
        sources.append({"name": "ls", "kind": "asr", "format": "librispeech", "path": "ls"})
    import yaml

    cfg = root / "corpus.yaml"
    cfg.write_text(yaml.safe_dump({"name": "hostile", "sources": sources}))
    return {"config": str(cfg)}


CASES = ["good", "fifo_image", "device_image", "sparse_8g_image", "sparse_64g_image",
         "image_at_size_limit", "png16_grey_10000x9999", "png16_rgb_10000x9999",
         "jpeg_10000x9999", "flac_10h_48k_stereo", "flac_10h_16k_mono",
         "flac_header_2^36_samples", "mov_100M_frames", "video_at_size_limit",
         "json_100k_deep", "json_200mb_string", "transcript_linked_to_etc_passwd"]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
cfg_path, out = sys.argv[2], sys.argv[3]
from flows.build.executors import LocalExecutor
from flows.build.pipeline import build
from schemas.config import load_config
t0 = time.time()
try:
    rep = build(load_config(cfg_path), out, executor=LocalExecutor())
    result = {s: v["reject_reasons"] for s, v in rep["sources"].items()}
    written = rep["totals"]["written"]
    ok = rep["accounted"]
except BaseException as err:  # the old code's failures, reported
    result, written, ok = f"{type(err).__name__}: {str(err)[:120]}", 0, False
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": round(time.time() - t0, 1), "rejects": result,
                  "written": written, "accounted": ok}))
"""


def run_case(code: Path, cfg: str, out: Path, cap_gb: float | None, timeout: float) -> dict:
    def limit() -> None:
        if cap_gb:
            cap = int(cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, PYTHONPATH=str(code), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, str(code), cfg, str(out)], cwd=code,
                           env=env, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"rss_mb": None, "seconds": timeout, "rejects": f"hung: killed after {timeout} s",
                "written": 0, "accounted": False}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"rss_mb": None, "seconds": None, "written": 0, "accounted": False,
                "rejects": f"died (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def bench_rss(cases: list[str], before: Path | None, work: Path) -> list[dict]:
    rows = []
    for name in cases:
        if name == "device_image" and os.geteuid() != 0:
            print(f"{name}: skipped (mknod needs root)")
            continue
        case_dir = work / name
        shutil.rmtree(case_dir, ignore_errors=True)
        cfg = make_case(name, case_dir / "in")["config"]
        row = {"case": name, "after": run_case(ROOT, cfg, case_dir / "out", None, 300)}
        if before is not None:
            # A FIFO blocks the old code for good and a device is read without end: bounded
            # by the timeout and the cap.
            row["before"] = run_case(before, cfg, case_dir / "out_before", 6, 120)
        shutil.rmtree(case_dir, ignore_errors=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# --- the guarded open's cost ---------------------------------------------------------------------

def bench_guard(n: int, rounds: int, work: Path) -> dict:
    import contextlib

    import storage.guard as guard
    import storage.media as media
    import storage.readers as readers
    from flows.build.executors import LocalExecutor
    from flows.build.pipeline import ingest, prepare
    from flows.corpora.scale import make_scale_inputs
    from schemas.config import load_config
    from schemas.rejects import Rejected
    from storage import uri

    cfg = load_config(make_scale_inputs(work / "scale_in", n, tts_cache=str(work / "tts")))
    spent = {"s": 0.0, "calls": 0}

    def timed(fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent["s"] += time.perf_counter() - t
                spent["calls"] += 1
        return wrapper

    def plain_read(path, kind, limits, root=None, shown=None):  # what media.fetcher did before
        if root is not None:
            media.resolve(root, os.path.relpath(path, root))
        try:
            return uri.read_bytes(path)
        except FileNotFoundError:
            raise Rejected("missing_media", f"{shown} not found") from None

    @contextlib.contextmanager
    def plain_open(path, kind, limits, root=None, shown=None):  # the readers' uri.open_read
        with uri.open_read(path) as f:
            yield f

    modes = {"guard": (guard.read_guarded, guard.open_guarded),
             "plain": (plain_read, plain_open)}
    results: dict[str, list[dict]] = {"guard": [], "plain": []}
    # a warm-up build, not counted: imports, the synthesis cache
    order = ["plain"] + [m for _ in range(rounds) for m in ("guard", "plain")]
    for i, mode in enumerate(order):
        read, opener = modes[mode]
        media.read_guarded = timed(read)

        @contextlib.contextmanager
        def counted_open(*a, _opener=opener, **kw):
            t = time.perf_counter()
            with _opener(*a, **kw) as f:
                spent["s"] += time.perf_counter() - t
                spent["calls"] += 1
                yield f

        readers.open_guarded = counted_open
        out = work / f"scale_out_{i}"
        shutil.rmtree(out, ignore_errors=True)
        spent.update(s=0.0, calls=0)
        c = prepare(cfg, str(out))
        t0 = time.perf_counter()
        stats, _ = ingest(c, str(out), executor=LocalExecutor())
        wall = time.perf_counter() - t0
        row = {"mode": mode, "ingest_s": round(wall, 2), "open_s": round(spent["s"], 3),
               "opens": spent["calls"], "inputs": sum(s.inputs for s in stats),
               "rejected": sum(s.rejected for s in stats)}
        print(json.dumps(row), flush=True)
        if i:  # the first is the warm-up
            results[mode].append(row)
        shutil.rmtree(out, ignore_errors=True)
    media.read_guarded, readers.open_guarded = modes["guard"]
    g = sorted(r["ingest_s"] for r in results["guard"])
    p = sorted(r["ingest_s"] for r in results["plain"])
    g_open = sum(r["open_s"] for r in results["guard"]) / len(results["guard"])
    p_open = sum(r["open_s"] for r in results["plain"]) / len(results["plain"])
    med_g, med_p = g[len(g) // 2], p[len(p) // 2]
    return {"n": n, "rounds": rounds, "guard": results["guard"], "plain": results["plain"],
            "wall_change_pct": round(100 * (med_g - med_p) / med_p, 2),
            "open_cost_pct": round(100 * (g_open - p_open) / med_g, 3),
            "guard_open_s": round(g_open, 3), "plain_open_s": round(p_open, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=10000, help="N of the scale corpus (0: skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", default="all", help="comma-separated, or all, or none")
    ap.add_argument("--before", type=Path, help="a checkout of the code before issue 25")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-hostile-", dir=ROOT / "bench"))
    work.mkdir(parents=True, exist_ok=True)
    cases = [] if args.cases == "none" else CASES if args.cases == "all" else args.cases.split(",")
    summary: dict = {}
    if cases:
        rows = bench_rss(cases, args.before, work)
        summary["rss"] = rows
        worst = max((r["after"]["rss_mb"] or 0) for r in rows)
        print(f"\nworst peak RSS after: {worst:.0f} MB (target < {TARGET_MB} MB): "
              f"{'met' if worst < TARGET_MB else 'NOT met'}")
    if args.scale:
        summary["guard"] = bench_guard(args.scale, args.rounds, work)
        print(json.dumps({k: v for k, v in summary["guard"].items()
                          if k not in ("guard", "plain")}))
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {work / 'summary.json'}")
    if not args.work:
        shutil.rmtree(work / "scale_in", ignore_errors=True)


if __name__ == "__main__":
    main()
