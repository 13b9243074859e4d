"""Peak memory of one worker on the largest media the defaults admit.

    .venv/bin/python bench/bench_memory.py

Builds, in-process (the local executor, so this process is the worker), a corpus of one
80-megapixel JPEG, one 60 s 1080p H.264 clip and one 30 s 48 kHz stereo WAV, and prints the
peak resident memory of a fresh process building each (imports included).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transforms.video import ffmpeg_exe  # noqa: E402


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vc-mem-"))
    media = tmp / "media"
    media.mkdir()
    small = np.random.default_rng(0).integers(0, 255, (250, 333, 3), dtype=np.uint8)
    Image.fromarray(small).resize((10000, 8000), Image.BICUBIC).save(media / "big.jpg", quality=85)
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=duration=60:size=1920x1080:rate=30", "-c:v", "libx264", "-preset",
                    "ultrafast", "-pix_fmt", "yuv420p", str(media / "long.mp4")], check=True)
    t = np.arange(30 * 48000) / 48000
    sf.write(media / "speech.wav", np.stack([0.3 * np.sin(2 * np.pi * 220 * t)] * 2, 1), 48000)
    sources = []
    for name, kind, rec in [
        ("img", "caption", {"id": "a", "image": "big.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]}),
        ("vid", "video", {"id": "b", "video": "long.mp4", "conversations": [
            {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "x"}]}),
        ("aud", "qa", {"id": "c", "audio": ["speech.wav"], "conversations": [
            {"from": "human", "value": "<audio>\n"}, {"from": "gpt", "value": "x"}]}),
    ]:
        (tmp / f"{name}.json").write_text(json.dumps([rec]))
        sources.append({"name": name, "kind": kind, "format": "vita", "path": f"{name}.json",
                        "media_root": "media"})
    print(f"sizes: image {(media / 'big.jpg').stat().st_size / 2**20:.1f} MB, "
          f"video {(media / 'long.mp4').stat().st_size / 2**20:.1f} MB")
    child = (
        "import json, resource, sys\n"
        "from flows.build.pipeline import build\n"
        "from schemas.config import config_from_dict\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "cfg = config_from_dict({'sources': [json.loads(sys.argv[1])]}, base=sys.argv[2])\n"
        "r = build(cfg, sys.argv[3])\n"
        "assert r['totals']['written'] == 1, r\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    print("| medium | peak RSS after imports | peak RSS after the build |")
    print("|---|---:|---:|")
    for src in sources:
        out = subprocess.run([sys.executable, "-c", child, json.dumps(src), str(tmp),
                              str(tmp / f"out-{src['name']}")], cwd=repo, check=True,
                             capture_output=True, text=True).stdout.split()
        print(f"| {src['name']} | {float(out[0]):.0f} MB | {float(out[1]):.0f} MB |")


if __name__ == "__main__":
    main()
